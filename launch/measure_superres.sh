#!/usr/bin/env bash
# Super-resolution, measured: train a super-resolution stage, upsample 200 held-out
# test images from their low-res versions, and compare PSNR (to the real image) with the
# bilinear upsampling the model is conditioned on; and how well the output,
# downsampled again, matches its low-res input.
#
#   ./launch/measure_superres.sh [WORKDIR] [digits|mnist] [STEPS]
#
# digits: configs/quickstart.py with superres.low_res=4 (4×4 → 8×8; ~3 min on CPU);
# mnist: configs/mnist5k_superres.py (14×14 → 28×28; ~6 s/step on the 2-core CPU
# machine, an accelerator job).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-workdirs/superres}
PRESET=${2:-digits}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$W"
if [ "$PRESET" = digits ]; then
  DATA=sklearn_digits; LOW=4; STEPS=${3:-600}
  ARGS=(--config=configs/quickstart.py --config.superres.low_res=4 --config.superres.noise_aug=0.1)
else
  DATA=mnist5k; LOW=14; STEPS=${3:-10000}
  ARGS=(--config=configs/mnist5k_superres.py)
fi
$PY launch/train.py "${ARGS[@]}" --workdir="$W/sr" --config.train.num_steps="$STEPS" \
    --config.train.sample_every=0
$PY - "$W" "$DATA" <<'PYEOF'
import sys
import numpy as np
from diffusion_jax import data, io
w, name = sys.argv[1:3]
x, y = data.load_arrays(name, "test")
np.savez(f"{w}/test200.npz", images=io.to_uint8(x[:200]), labels=y[:200])
PYEOF
$PY launch/sample.py --workdir="$W/sr" --input="$W/test200.npz" --num_samples=200 \
    --output="$W/sr200.npz" --grid
$PY - "$W" "$LOW" <<'PYEOF'
import sys
import jax
import numpy as np
from diffusion_jax import io
w, low_res = sys.argv[1], int(sys.argv[2])
real = io.from_uint8(np.load(f"{w}/test200.npz")["images"])
sr = io.from_uint8(np.load(f"{w}/sr200.npz")["images"])
n, c = real.shape[0], real.shape[-1]
low = jax.image.resize(real, (n, low_res, low_res, c), "linear", antialias=True)
bilinear = np.clip(np.asarray(jax.image.resize(low, real.shape, "linear")), -1, 1)
def psnr(a, b):  # images in [-1, 1]: peak-to-peak 2
  mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(4.0 / mse)))
sr_low = jax.image.resize(sr, low.shape, "linear", antialias=True)
print(f"PSNR vs the real images ({n} test images): bilinear {psnr(bilinear, real):.2f} dB, "
      f"super-resolution {psnr(sr, real):.2f} dB")
print(f"consistency, PSNR of the output downsampled vs the {low_res}x{low_res} input: "
      f"{psnr(np.asarray(sr_low), np.asarray(low)):.2f} dB")
PYEOF
