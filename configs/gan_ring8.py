"""An MLP GAN on the ring of 8 Gaussians (2-D points; the mode-coverage benchmark).

Hinge loss with a small R1 penalty on real data (Mescheder et al. 2018), Adam with
β₁ = 0.5 (DCGAN's setting), an EMA generator. Chosen by a sweep (2026-11-23, docs/gan.md):
of 2,500 EMA samples, 8/8 modes covered and 87–90 % within 3σ of a mode for seeds 0, 1,
3, 4 (the non-saturating loss with R1 0.1 covered 8 modes but put only 44–61 % near one;
hinge without R1 at width 128 lost 2 modes for one seed). Samples are 2-D points, not images: no sample grids; read
them with `diffusion-jax-sample --output=x.npz` (`values`) and score them with
`launch/gan_modes.py` (modes covered, high-quality fraction).

  diffusion-jax-train --config=configs/gan_ring8.py --workdir=/tmp/ring8
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = base()
  c.task = "gan"
  c.data.name = "ring8"
  c.data.batch_size = 256
  c.model.class_conditional = False
  c.gan.update(generator="mlp", discriminator="mlp", d_norm="none")
  c.gan.update(mlp_width=256, mlp_depth=3, latent_dim=16)
  c.gan.loss = "hinge"
  c.gan.r1_weight = 0.01
  common.dcgan_adam(c, lr=1e-3)
  c.train.update(num_steps=5000, log_every=250, checkpoint_every=1000, ema_decay=0.99)
  c.sample.per_class = 0  # points, not images: no PNG grids
  return c
