#!/usr/bin/env bash
# Super-resolution 14×14 → 28×28 on the embedded MNIST subset, measured: train
# configs/mnist5k_superres.py for STEPS steps, upsample 200 held-out test digits from
# their 14×14 versions, and compare PSNR (to the real 28×28 digit) with the bilinear
# upsampling the model is conditioned on; and how well the output, downsampled again,
# matches its 14×14 input.
#
#   ./launch/measure_superres.sh [WORKDIR] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-workdirs/superres}
STEPS=${2:-2000}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$W"
$PY launch/train.py --config=configs/mnist5k_superres.py --workdir="$W/sr" \
    --config.train.num_steps="$STEPS" --config.train.sample_every=0
$PY - "$W" <<'PYEOF'
import sys
import numpy as np
from diffusion_jax import data, io
w = sys.argv[1]
x, y = data.load_arrays("mnist5k", "test")
np.savez(f"{w}/test200.npz", images=io.to_uint8(x[:200]), labels=y[:200])
PYEOF
$PY launch/sample.py --workdir="$W/sr" --input="$W/test200.npz" --num_samples=200 \
    --output="$W/sr200.npz" --grid
$PY - "$W" <<'PYEOF'
import sys
import jax
import numpy as np
from diffusion_jax import io
w = sys.argv[1]
real = io.from_uint8(np.load(f"{w}/test200.npz")["images"])
sr = io.from_uint8(np.load(f"{w}/sr200.npz")["images"])
low = jax.image.resize(real, (200, 14, 14, 1), "linear", antialias=True)
bilinear = np.clip(np.asarray(jax.image.resize(low, real.shape, "linear")), -1, 1)
def psnr(a, b):  # images in [-1, 1]: peak-to-peak 2
  mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(4.0 / mse)))
sr_low = jax.image.resize(sr, low.shape, "linear", antialias=True)
print(f"PSNR vs real 28x28 (200 test digits): bilinear {psnr(bilinear, real):.2f} dB, "
      f"super-resolution {psnr(sr, real):.2f} dB")
print(f"consistency, PSNR of the output downsampled vs the 14x14 input: "
      f"{psnr(np.asarray(sr_low), np.asarray(low)):.2f} dB")
PYEOF
