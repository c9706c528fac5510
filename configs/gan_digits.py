"""A class-conditional DCGAN on the embedded 8×8 digits (CPU, minutes): conditional
BatchNorm generator, projection discriminator, non-saturating loss, Adam(2e-4, β₁ 0.5)
as in Radford et al. 2016.

  diffusion-jax-train --config=configs/gan_digits.py --workdir=/tmp/gan_digits

Measured 2026-11-23 (2-core CPU, ≈ 2 min): launch/class_accuracy.py sample accuracy
0.968 (the domain classifier's ceiling on real test digits: 0.990).
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.digits_data(base())
  common.dcgan(c, channels=64, latent_dim=32)
  c.model.class_conditional = True
  common.dcgan_adam(c)
  c.train.update(num_steps=2000, log_every=100, checkpoint_every=1000, ema_decay=0.999)
  return c
