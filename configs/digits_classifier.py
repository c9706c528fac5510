"""A noise-conditional classifier p(y | x_t, t) on the embedded 8×8 digits, on the
quickstart's path (rectified flow), for classifier guidance:

  diffusion-jax-train --config=configs/digits_classifier.py --workdir=/tmp/digits_cls
  diffusion-jax-sample --workdir=/tmp/quickstart_uncond --classifier_workdir=/tmp/digits_cls \
      --classifier_scale=2 --labels=0,1,2 --num_samples=30 --output=/tmp/guided.npz

t is drawn uniformly (guidance queries the classifier at every t of the sampler), not
logit-normal as the denoiser's training does. With --config.classifier.noise_conditional=False
it is a clean-image classifier instead.
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.task = "classifier"
  c.data.name = "sklearn_digits"
  c.data.batch_size = 128
  c.model.channels = 16
  c.model.channel_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.diffusion.path = "flow"
  c.diffusion.time_sampling = "uniform"
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.train.num_steps = 1000
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.ema_decay = 0.995
  return c
