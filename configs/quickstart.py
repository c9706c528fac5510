"""Quickstart: class-conditional rectified flow on the embedded 8×8 digits (CPU, ~2 min).

Measured on the 2-core CI machine: 600 steps at ~8 steps/s; 100% of 200 CFG samples
(w = 1, 32 Euler steps) classified as their requested class (see docs/quickstart.md).

  diffusion-jax-train --config=configs/quickstart.py --workdir=/tmp/quickstart
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.data.name = "sklearn_digits"
  c.data.batch_size = 128
  c.model.channels = 16
  c.model.channel_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.diffusion.path = "flow"
  c.diffusion.prediction = "velocity"
  c.diffusion.time_sampling = "logit_normal"
  c.sample.sampler = "euler"
  c.sample.num_steps = 32
  c.sample.guidance = 1.0
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.train.num_steps = 600
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.ema_decay = 0.995
  return c
