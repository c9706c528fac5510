"""Quickstart: class-conditional rectified flow on the embedded 8×8 digits (CPU, ~2 min).

Measured on the 2-core CI machine: 600 steps at ~8 steps/s; 100% of 200 CFG samples
(w = 1, 32 Euler steps) classified as their requested class (see docs/quickstart.md).

  diffusion-jax-train --config=configs/quickstart.py --workdir=/tmp/quickstart
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.digits_data(base())
  common.digits_unet(c)
  common.rectified_flow(c, sample_steps=32)
  common.quickstart_training(c)
  return c
