"""A VAE on the embedded 5,000 MNIST digits, binarised afresh every step (dynamic
binarisation) with a Bernoulli decoder: the binarised-MNIST setting of Kingma & Welling
2014 and Burda et al. 2016 (MLP encoder and decoder, two hidden layers of 512, a
32-dimensional latent). Its bounds are of the binary images (nats, bits per binary
pixel; docs/vae.md). Unconditional; `--config.model.class_conditional=True` makes it
a conditional VAE; `--config.vae.likelihood=logistic --config.vae.binarize=False`
models the 8-bit pixels instead.

  diffusion-jax-train --config=configs/mnist5k_vae.py --workdir=/tmp/mnist5k_vae

Measured (10,000 steps, 11.5 min on the loaded 2-core CPU): on the 500 held-out digits,
ELBO −101.3 nats, IWAE-64 −95.8, IWAE-512 −94.9 (docs/vae.md).
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.mnist5k_data(base(), batch_size=100)
  c.task = "vae"
  c.vae.update(network="mlp", latent_dim=32, width=512, depth=2, likelihood="bernoulli",
               binarize=True)
  c.model.class_conditional = False
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.train.update(num_steps=10000, log_every=200, checkpoint_every=2000, sample_every=2000,
                 ema_decay=0.999)
  return c
