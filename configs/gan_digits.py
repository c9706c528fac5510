"""A class-conditional DCGAN on the embedded 8×8 digits (CPU, minutes): conditional
BatchNorm generator, projection discriminator, non-saturating loss, Adam(2e-4, β₁ 0.5)
as in Radford et al. 2016.

  diffusion-jax-train --config=configs/gan_digits.py --workdir=/tmp/gan_digits

Measured 2026-11-23 (2-core CPU, ≈ 2 min): launch/class_accuracy.py sample accuracy
0.968 (the domain classifier's ceiling on real test digits: 0.990).
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.task = "gan"
  c.data.name = "sklearn_digits"
  c.data.batch_size = 128
  c.model.class_conditional = True
  c.gan.generator = "dcgan"
  c.gan.discriminator = "dcgan"
  c.gan.channels = 64
  c.gan.latent_dim = 32
  c.gan.loss = "non_saturating"
  c.optim.name = "adam"
  c.optim.lr = 2e-4
  c.optim.b1 = 0.5
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.train.num_steps = 2000
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.ema_decay = 0.999
  return c
