"""Class-conditional rectified flow on the embedded 5,000-image MNIST subset (28×28)."""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.data.name = "mnist5k"
  c.data.batch_size = 64
  c.model.channels = 32
  c.model.channel_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (7,)
  c.diffusion.path = "flow"
  c.diffusion.prediction = "velocity"
  c.diffusion.time_sampling = "logit_normal"
  c.sample.sampler = "euler"
  c.sample.num_steps = 50
  c.optim.lr = 1e-3
  c.train.num_steps = 20000
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.train.sample_every = 2000
  return c
