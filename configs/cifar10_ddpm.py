"""DDPM on CIFAR-10 (Ho et al. 2020: linear betas, T = 1000, ε-prediction, the
unconditional 35.7M-param U-Net — 35,746,307 parameters, as the official model: additive
time embedding, single-head attention at 16×16, dropout 0.1). Needs the TFDS dataset
prepared beforehand in array_record format:
  tfds build cifar10 --file_format=array_record   (on a machine with internet)
then --config.data.data_dir=<its data_dir>."""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.data.name = "cifar10"
  c.data.batch_size = 128
  c.data.random_flip = True
  c.data.num_threads = 8
  c.model.channels = 128
  c.model.channel_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.num_heads = 1                   # DDPM's attention is single-head
  c.model.dropout = 0.1
  c.model.scale_shift_norm = False        # h + Dense(temb) after the first conv (not AdaGN)
  c.model.class_conditional = False       # DDPM's CIFAR-10 model is unconditional
  c.diffusion.path = "vp_discrete"
  c.diffusion.prediction = "eps"
  c.diffusion.beta_schedule = "linear"
  c.diffusion.time_sampling = "discrete"
  c.sample.sampler = "ddpm"
  c.sample.num_steps = 1000
  c.sample.clip_x0 = True
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.schedule = "constant"
  c.train.num_steps = 800_000
  c.train.log_every = 100
  c.train.checkpoint_every = 10_000
  c.train.sample_every = 10_000
  c.train.ema_decay = 0.9999
  return c
