"""A DCGAN on the embedded 5,000 MNIST digits (28×28: 7 → 14 → 28), unconditional by
default; `--config.model.class_conditional=True` (or configs/gan_mnist5k_cond.py) makes
it conditional (conditional BatchNorm + projection discriminator).

  diffusion-jax-train --config=configs/gan_mnist5k.py --workdir=/tmp/gan_mnist5k

Measured, conditional (2026-11-23, 2-core CPU, 3,000 steps in ≈ 11 min):
launch/class_accuracy.py gives sample accuracy 0.948 (classifier ceiling 0.936).
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.mnist5k_data(base())
  common.dcgan(c, channels=32, latent_dim=64)
  c.model.class_conditional = False
  common.dcgan_adam(c)
  c.train.update(num_steps=3000, log_every=100, checkpoint_every=1000, sample_every=1000,
                 ema_decay=0.999)
  return c
