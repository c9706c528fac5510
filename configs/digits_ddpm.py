"""DDPM (ε-prediction, discrete T = 1000, cosine betas) on the embedded 8×8 digits,
sampled with DDIM; switch to ancestral with --config.sample.sampler=ddpm."""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.data.name = "sklearn_digits"
  c.data.batch_size = 128
  c.model.channels = 32
  c.model.channel_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.diffusion.path = "vp_discrete"
  c.diffusion.prediction = "eps"
  c.diffusion.num_steps = 1000
  c.diffusion.beta_schedule = "cosine"
  c.diffusion.time_sampling = "discrete"
  c.sample.sampler = "ddim"
  c.sample.num_steps = 50
  c.sample.clip_x0 = True
  c.optim.lr = 2e-3
  c.train.num_steps = 3000
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.ema_decay = 0.995
  return c
