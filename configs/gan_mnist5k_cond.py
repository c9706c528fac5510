"""Class-conditional DCGAN on the embedded MNIST subset: configs/gan_mnist5k.py with
conditional BatchNorm in the generator and a projection discriminator.

  diffusion-jax-train --config=configs/gan_mnist5k_cond.py --workdir=/tmp/gan_cond
"""
import importlib.util
import os


def get_config():
  spec = importlib.util.spec_from_file_location(
      "gan_mnist5k", os.path.join(os.path.dirname(os.path.abspath(__file__)), "gan_mnist5k.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.class_conditional = True
  return c
