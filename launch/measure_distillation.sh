#!/usr/bin/env bash
# Few-step generation on the 8×8 digits: the quickstart teacher, every distillation
# method from it, and each at 1 / 2 / 4 / 8 NFE beside the teacher's samplers, scored by
# the domain classifier (accuracy, domain FD) and by FD on the raw pixels
# (eval.pixel_features), each with its data floor (train vs test split).
#
#   bash launch/measure_distillation.sh [OUT=/tmp/distill]
#
# Results: one JSON line per (run, sampler, steps) in $OUT/results.jsonl; wall times of
# each training in $OUT/times.txt. docs/benchmarks.md ("Few-step generation") has the
# numbers measured with these commands on the 2-core CPU.
set -euo pipefail
OUT=${1:-/tmp/distill}
mkdir -p "$OUT"
T="diffusion-jax-train"
timed() { local name=$1; shift; local s=$(date +%s); "$@"; echo "$name $(( $(date +%s) - s )) s" >> "$OUT/times.txt"; }

timed teacher $T --config=quickstart --workdir="$OUT/teacher"
timed domain $T --config=digits_classifier --config.classifier.noise_conditional=False \
    --workdir="$OUT/domain"
timed progressive diffusion-jax-progressive --config=configs/digits_progressive.py \
    --teacher="$OUT/teacher" --workdir="$OUT/pd" --start_steps=16 --end_steps=1 \
    --config.train.num_steps=600 --config.train.checkpoint_every=600
timed guidance $T --config=digits_guidance_distillation --workdir="$OUT/guided" \
    --config.distill.teacher="$OUT/teacher"
timed guided_progressive diffusion-jax-progressive --config=configs/digits_guided_progressive.py \
    --teacher="$OUT/guided" --workdir="$OUT/gpd" --start_steps=8 --end_steps=1 \
    --config.train.num_steps=500 --config.train.checkpoint_every=500
timed consistency_distillation $T --config=digits_consistency --workdir="$OUT/cd" \
    --config.distill.teacher="$OUT/teacher"
timed consistency_training $T --config=digits_consistency_training --workdir="$OUT/ct"
timed adversarial $T --config=digits_adversarial_distillation --workdir="$OUT/add" \
    --config.distill.teacher="$OUT/teacher"

score() {  # workdir sampler steps
  diffusion-jax-evaluate --workdir="$1" --config.eval.feature_workdir="$OUT/domain" \
      --config.eval.pixel_features=True --config.eval.metrics=fd,acc \
      --config.eval.num_samples=1000 --config.sample.sampler="$2" \
      --config.sample.num_steps="$3" 2>/dev/null | python3 -c "
import json, sys; t = sys.stdin.read(); d = json.loads(t[t.index('{'):])
print(json.dumps({'run': '$1', 'sampler': '$2', 'steps': $3, 'guidance': d['guidance'],
                  'acc': d['acc_domain'], 'fd_domain': d['fd_domain'],
                  'fd_domain_floor': d['fd_domain_floor'], 'fd_pixels': d['fd_pixels'],
                  'fd_pixels_floor': d['fd_pixels_floor']}))" >> "$OUT/results.jsonl"
}
for s in euler dpm_solver_2m dpm_solver_3m unipc; do
  for n in 1 2 4 8 16 32; do score "$OUT/teacher" $s $n; done
done
for n in 16 8 4 2 1; do score "$OUT/pd/steps_$n" ddim $n; done
for n in 8 32; do score "$OUT/guided" euler $n; done
for n in 8 4 2 1; do score "$OUT/gpd/steps_$n" ddim $n; done
for run in cd ct add; do for n in 1 2 4 8; do score "$OUT/$run" consistency $n; done; done
cat "$OUT/times.txt"
