"""An MLP GAN on the ring of 8 Gaussians (2-D points; the mode-coverage benchmark).

Non-saturating loss with an R1 penalty on real data (Mescheder et al. 2018), Adam with
β₁ = 0.5 (DCGAN's setting). Samples are 2-D points, not images: no sample grids; read
them with `diffusion-jax-sample --output=x.npz` (`values`) and score them with
`launch/gan_modes.py` (modes covered, high-quality fraction).

  diffusion-jax-train --config=configs/gan_ring8.py --workdir=/tmp/ring8
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.task = "gan"
  c.data.name = "ring8"
  c.data.batch_size = 256
  c.model.class_conditional = False
  c.gan.generator = "mlp"
  c.gan.discriminator = "mlp"
  c.gan.d_norm = "none"
  c.gan.mlp_width = 128
  c.gan.mlp_depth = 3
  c.gan.latent_dim = 16
  c.gan.loss = "non_saturating"
  c.gan.r1_weight = 0.1
  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.b1 = 0.5
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  c.train.num_steps = 3000
  c.train.log_every = 250
  c.train.checkpoint_every = 1000
  c.train.ema_decay = 0.99
  c.sample.per_class = 0  # points, not images: no PNG grids
  return c
