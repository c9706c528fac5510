"""Class-conditional DCGAN on the embedded MNIST subset: configs/gan_mnist5k.py with
conditional BatchNorm in the generator and a projection discriminator.

  diffusion-jax-train --config=configs/gan_mnist5k_cond.py --workdir=/tmp/gan_cond
"""
from diffusion_jax_configs import gan_mnist5k


def get_config():
  c = gan_mnist5k.get_config()
  c.model.class_conditional = True
  return c
