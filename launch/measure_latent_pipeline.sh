#!/usr/bin/env bash
# The latent-diffusion pipeline on mnist5k, timed stage by stage, against the pixel-space
# model of the same data for the same training time:
#   1. the latent autoencoder (configs/mnist5k_autoencoder.py), its held-out PSNR / SSIM
#   2. the latent cache (diffusion-jax-encode)
#   3. class-conditional latent diffusion on it (configs/mnist5k_latent.py)
#   4. launch/class_accuracy.py of its decoded samples (the domain MLP classifier)
#   5. the pixel-space flow (configs/mnist5k_flow.py) trained for the wall time of
#      stages 1-3, and its class accuracy.
# Prints one line per stage (seconds) and writes $W/summary.json.
#
#   ./launch/measure_latent_pipeline.sh WORKDIR [LDM_STEPS] [PIXEL_SECONDS]
#
# Environment: PYTHON (default .venv/bin/python), AE_STEPS (default: the config's).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:?usage: $0 WORKDIR [LDM_STEPS] [PIXEL_SECONDS]}
LDM_STEPS=${2:-2000}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$W"
t() { local s=$SECONDS; "$@" > "$W/$STAGE.log" 2>&1; echo "$STAGE $((SECONDS - s)) s" | tee -a "$W/times.txt"; }
AE_FLAGS=()
[ -n "${AE_STEPS:-}" ] && AE_FLAGS=(--config.train.num_steps="$AE_STEPS")
STAGE=autoencoder t $PY launch/train.py --config=configs/mnist5k_autoencoder.py --workdir="$W/ae" "${AE_FLAGS[@]}"
STAGE=ae_eval t $PY launch/evaluate.py --workdir="$W/ae" --config.eval.metrics=psnr,ssim --config.eval.num_samples=500
STAGE=encode t $PY launch/encode.py --autoencoder="$W/ae" --dataset=mnist5k --output_dir="$W/latents" --batch_size=250
STAGE=ldm t $PY launch/train.py --config=configs/mnist5k_latent.py --workdir="$W/ldm" \
    --config.data.name="$W/latents" --config.train.num_steps="$LDM_STEPS"
STAGE=ldm_accuracy t $PY launch/class_accuracy.py --workdir="$W/ldm" --num_samples=1000
PIXEL_SECONDS=${3:-$(awk '/^(autoencoder|encode|ldm) /{s+=$2} END{print s}' "$W/times.txt")}
# The pixel model trains for the same wall time: stop it by SIGTERM (it checkpoints).
STAGE=pixel t timeout -s TERM "$PIXEL_SECONDS" $PY launch/train.py --config=configs/mnist5k_flow.py \
    --workdir="$W/pixel" --config.train.sample_every=0 || true
STAGE=pixel_accuracy t $PY launch/class_accuracy.py --workdir="$W/pixel" --num_samples=1000
tail -n 3 "$W"/*accuracy.log "$W/ae_eval.log"
