"""Class-conditional rectified flow on the embedded 5,000-image MNIST subset (28×28)."""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.mnist5k_data(base())
  common.mnist5k_unet(c)
  common.rectified_flow(c, sample_steps=50)
  c.optim.lr = 1e-3
  c.train.update(num_steps=20000, log_every=100, checkpoint_every=2000, sample_every=2000)
  return c
