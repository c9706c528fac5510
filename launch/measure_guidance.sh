#!/usr/bin/env bash
# Classifier guidance on the embedded digits, measured: an unconditional rectified-flow
# model (configs/quickstart.py with model.class_conditional=False) guided by the
# noise-conditional classifier of configs/digits_classifier.py, at several scales.
# Prints the fraction of 200 samples (20 per class) that the quickstart's MLP domain
# classifier (trained on the real train split) assigns to the requested class.
#
#   ./launch/measure_guidance.sh [WORKDIR]      (~6 min on the 2-core CPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-workdirs/guidance}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$W"
$PY launch/train.py --config=configs/quickstart.py --config.model.class_conditional=False \
    --workdir="$W/uncond"
$PY launch/train.py --config=configs/digits_classifier.py --workdir="$W/cls"
for s in 0 1 2 4; do
  $PY launch/sample.py --workdir="$W/uncond" --classifier_workdir="$W/cls" \
      --classifier_scale=$s --labels=0,1,2,3,4,5,6,7,8,9 --num_samples=200 \
      --output="$W/guided_s$s.npz"
done
$PY - "$W" <<'PYEOF'
import sys
import numpy as np
from diffusion_jax import data, io
from diffusion_jax.evaluation import classifier
w = sys.argv[1]
x, y = data.load_arrays("sklearn_digits", "train")
xt, yt = data.load_arrays("sklearn_digits", "test")
clf = classifier.train(x, y, 10)
print(f"domain classifier test accuracy {classifier.accuracy(clf, xt, yt, 10):.3f}")
for s in (0, 1, 2, 4):
  d = np.load(f"{w}/guided_s{s}.npz")
  acc = classifier.accuracy(clf, io.from_uint8(d["images"]), d["labels"], 10)
  print(f"classifier_scale={s}: sample accuracy {acc:.3f}")
PYEOF
