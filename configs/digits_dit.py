"""Class-conditional rectified flow with a DiT (Peebles & Xie 2023) on the embedded 8×8
digits: the quickstart with the U-Net swapped for a small transformer (CPU, minutes).

  diffusion-jax-train --config=configs/digits_dit.py --workdir=/tmp/digits_dit
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.data.name = "sklearn_digits"
  c.data.batch_size = 128
  c.model.name = "dit"
  c.model.hidden_size = 96
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.patch_size = 2
  c.model.scan = False
  c.diffusion.path = "flow"
  c.diffusion.prediction = "velocity"
  c.diffusion.time_sampling = "logit_normal"
  c.sample.sampler = "euler"
  c.sample.num_steps = 32
  c.sample.guidance = 1.0
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.train.num_steps = 1000
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.ema_decay = 0.995
  return c
