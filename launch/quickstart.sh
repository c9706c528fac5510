#!/usr/bin/env bash
# Installs diffusion_jax into ./.venv (if not there yet) and runs the quickstart:
# trains configs/quickstart.py on CPU, writes a PNG grid of class-conditional samples
# and reports their accuracy under a classifier trained on the real digits.
# It installs the library alone (no extras: nothing the quickstart does not import), at
# the versions CI tests; ./launch/test.sh adds the test and reference extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/diffusion-jax-quickstart ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -c .ci/constraints.txt -e .
fi
exec .venv/bin/diffusion-jax-quickstart "$@"
