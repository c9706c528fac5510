#!/usr/bin/env bash
# Teaching a held-out digit on the 8×8 digits (docs/finetuning.md, "Measured"): a clip
# run and a text-to-image base trained with the 9s held out, then plain fine-tuning,
# DreamBooth (full and LoRA, with and without prior preservation) and textual inversion,
# each taught "9" from the first five training 9s, each scored by
# launch/measure_finetuning.py (the domain MLP trained on all ten digits: the share of
# concept samples it calls 9, and the accuracy on the prompts of the digits 0-8).
#
#   bash launch/measure_finetuning.sh [OUT=/tmp/finetune]
#
# Results: one JSON line per run in $OUT/results.jsonl; training wall times in
# $OUT/times.txt; the adapter / checkpoint sizes in $OUT/sizes.txt.
set -euo pipefail
OUT=${1:-/tmp/finetune}
mkdir -p "$OUT"
T="diffusion-jax-train"
M="python launch/measure_finetuning.py"
NO9="--config.data.labels=(0,1,2,3,4,5,6,7,8)"
CLIP="--config.text.clip_workdir=$OUT/clip_no9"
BASE="--config.init.from_workdir=$OUT/t2i_no9"
timed() { local name=$1; shift; local s=$(date +%s); "$@"; echo "$name $(( $(date +%s) - s )) s" >> "$OUT/times.txt"; }
measure() { local name=$1; shift; echo "{\"run\": \"$name\", \"result\": $($M "$@")}" >> "$OUT/results.jsonl"; }
NINE=(--concept_prompt="a photo of the digit nine" --concept_prompt="a handwritten 9"
      --concept_prompt="the number nine" --concept_prompt="a drawing of the digit 9"
      --concept_prompt="an image of a nine" --concept_prompt="nine"
      --concept_prompt="the digit 9" --concept_prompt="a scan of a handwritten nine")
V=(--concept_prompt="a photo of the digit <v>" --concept_prompt="a handwritten <v>"
   --concept_prompt="the number <v>" --concept_prompt="a drawing of the digit <v>"
   --concept_prompt="an image of a <v>" --concept_prompt="<v>"
   --concept_prompt="the digit <v>" --concept_prompt="a scan of a handwritten <v>")
SKS=(--concept_prompt="a sks digit")

timed clip_no9 $T --config=digits_clip --workdir="$OUT/clip_no9" "$NO9"
timed t2i_no9 $T --config=digits_t2i --workdir="$OUT/t2i_no9" $CLIP "$NO9"
measure base_nine_prompts --workdir="$OUT/t2i_no9" "${NINE[@]}"
measure base_sks_prompt --workdir="$OUT/t2i_no9" "${SKS[@]}"
# DreamBooth's class images: drawn once by the base model for the class prompt.
timed class_images diffusion-jax-sample --workdir="$OUT/t2i_no9" --num_samples=100 \
    --prompt="a digit" --output="$OUT/class_digit.npz" --grid
diffusion-jax-images --input="$OUT/class_digit.npz" --caption="a digit" --output="$OUT/class_digit"

timed plain $T --config=digits_finetune --workdir="$OUT/plain" $CLIP $BASE
measure plain --workdir="$OUT/plain" "${NINE[@]}"
timed dreambooth $T --config=digits_dreambooth --workdir="$OUT/db" $CLIP $BASE \
    --config.data.paired_name="$OUT/class_digit"
measure dreambooth --workdir="$OUT/db" "${SKS[@]}"
timed dreambooth_noprior $T --config=digits_dreambooth --workdir="$OUT/db_noprior" $CLIP $BASE
measure dreambooth_noprior --workdir="$OUT/db_noprior" "${SKS[@]}"
timed dreambooth_lora $T --config=digits_dreambooth_lora --workdir="$OUT/db_lora" $CLIP $BASE \
    --config.data.paired_name="$OUT/class_digit"
measure dreambooth_lora --workdir="$OUT/db_lora" "${SKS[@]}"
timed dreambooth_lora_noprior $T --config=digits_dreambooth_lora --workdir="$OUT/db_lora_noprior" \
    $CLIP $BASE
measure dreambooth_lora_noprior --workdir="$OUT/db_lora_noprior" "${SKS[@]}"
timed textual_inversion $T --config=digits_textual_inversion --workdir="$OUT/ti" $CLIP $BASE
measure textual_inversion --workdir="$OUT/ti" "${V[@]}"
# The adapter files onto the base run (what a user of the files gets).
measure dreambooth_lora_file --workdir="$OUT/t2i_no9" "${SKS[@]}" \
    --adapter="$OUT/db_lora/adapters/300.safetensors"
measure textual_inversion_file --workdir="$OUT/t2i_no9" "${V[@]}" \
    --adapter="$OUT/ti/adapters/400.safetensors"
{ du -b "$OUT"/db_lora/adapters/300.safetensors "$OUT"/ti/adapters/400.safetensors
  du -sb "$OUT"/db_lora/checkpoints/300 "$OUT"/ti/checkpoints/400 "$OUT"/t2i_no9/checkpoints/600
} > "$OUT/sizes.txt"

# Textual inversion's control: the same method on a base that saw every digit (it can
# only find what its frozen model already draws).
timed t2i_all $T --config=digits_t2i --workdir="$OUT/t2i_all" $CLIP
timed textual_inversion_all $T --config=digits_textual_inversion --workdir="$OUT/ti_all" $CLIP \
    --config.init.from_workdir="$OUT/t2i_all"
measure textual_inversion_all --workdir="$OUT/ti_all" "${V[@]}"

# A class-conditional base (the quickstart's model, 9s held out) taught class 9 by LoRA +
# the class table (configs/digits_lora.py).
timed quickstart_no9 $T --config=quickstart --workdir="$OUT/qs_no9" "$NO9"
measure quickstart_no9 --workdir="$OUT/qs_no9"
timed lora_class $T --config=digits_lora --workdir="$OUT/lora_class" \
    --config.init.from_workdir="$OUT/qs_no9"
measure lora_class --workdir="$OUT/lora_class"
