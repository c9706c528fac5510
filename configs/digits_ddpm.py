"""DDPM (ε-prediction, discrete T = 1000, cosine betas) on the embedded 8×8 digits,
sampled with DDIM; switch to ancestral with --config.sample.sampler=ddpm."""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.digits_data(base())
  common.digits_unet(c, channels=32)
  common.ddpm(c, beta_schedule="cosine")
  c.sample.sampler = "ddim"
  c.sample.num_steps = 50
  common.quickstart_training(c, num_steps=3000, checkpoint_every=1000)
  return c
