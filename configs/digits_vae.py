"""A VAE on the embedded 8×8 digits (CPU, about a minute): MLP encoder and decoder (two
hidden layers of 256), a 16-dimensional latent, a discretised-logistic decoder over the
8-bit pixel values (Salimans et al. 2017) with a learned per-pixel scale, so its ELBO
and IWAE bounds are bits/dim of the 8-bit digits directly (docs/vae.md).
Unconditional; `--config.model.class_conditional=True` makes it a conditional VAE.

  diffusion-jax-train --config=configs/digits_vae.py --workdir=/tmp/digits_vae
  diffusion-jax-sample --workdir=/tmp/digits_vae --num_samples=64 --output=/tmp/v.npz --grid

Measured (3,000 steps, 1.5 min on the loaded 2-core CPU): on the 296 test digits, ELBO
3.714 bits/dim, IWAE-64 3.612, IWAE-512 3.594 (docs/vae.md).
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.digits_data(base())
  c.task = "vae"
  c.vae.update(network="mlp", latent_dim=16, width=256, depth=2, likelihood="logistic")
  c.model.class_conditional = False
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.train.update(num_steps=3000, log_every=100, checkpoint_every=1000, ema_decay=0.999)
  return c
