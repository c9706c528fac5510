"""DDPM on CIFAR-10 (Ho et al. 2020: linear betas, T = 1000, ε-prediction, the
unconditional 35.7M-param U-Net — 35,746,307 parameters, as the official model: additive
time embedding, single-head attention at 16×16, dropout 0.1). Needs the TFDS dataset
prepared beforehand in array_record format:
  tfds build cifar10 --file_format=array_record   (on a machine with internet)
then --config.data.data_dir=<its data_dir>."""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = base()
  c.data.update(name="cifar10", batch_size=128, random_flip=True, num_threads=8)
  c.model.channels = 128
  c.model.channel_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.num_heads = 1                   # DDPM's attention is single-head
  c.model.dropout = 0.1
  c.model.scale_shift_norm = False        # h + Dense(temb) after the first conv (not AdaGN)
  c.model.class_conditional = False       # DDPM's CIFAR-10 model is unconditional
  common.ddpm(c, beta_schedule="linear")
  c.sample.sampler = "ddpm"
  c.sample.num_steps = 1000
  c.optim.update(lr=2e-4, warmup_steps=5000, schedule="constant")
  c.train.update(num_steps=800_000, log_every=100, checkpoint_every=10_000,
                 sample_every=10_000, ema_decay=0.9999)
  return c
