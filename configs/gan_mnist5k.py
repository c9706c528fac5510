"""A DCGAN on the embedded 5,000 MNIST digits (28×28: 7 → 14 → 28), unconditional by
default; `--config.model.class_conditional=True` (or configs/gan_mnist5k_cond.py) makes
it conditional (conditional BatchNorm + projection discriminator).

  diffusion-jax-train --config=configs/gan_mnist5k.py --workdir=/tmp/gan_mnist5k

Measured, conditional (2026-11-23, 2-core CPU, 3,000 steps in ≈ 11 min):
launch/class_accuracy.py gives sample accuracy 0.948 (classifier ceiling 0.936).
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.task = "gan"
  c.data.name = "mnist5k"
  c.data.batch_size = 64
  c.model.class_conditional = False
  c.gan.generator = "dcgan"
  c.gan.discriminator = "dcgan"
  c.gan.channels = 32
  c.gan.latent_dim = 64
  c.gan.loss = "non_saturating"
  c.optim.name = "adam"
  c.optim.lr = 2e-4
  c.optim.b1 = 0.5
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.train.num_steps = 3000
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.sample_every = 1000
  c.train.ema_decay = 0.999
  return c
