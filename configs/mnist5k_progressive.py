"""Progressive distillation of configs/mnist5k_flow.py (Salimans & Ho 2022): one round
of the chain 32 → 16 → … → 1, CFG w = 1 baked in (the student samples with w = 0).

  diffusion-jax-progressive --config=configs/mnist5k_progressive.py \
      --teacher=/tmp/mnist5k_flow --workdir=/tmp/pd_mnist5k --start_steps=32 --end_steps=1
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.mnist5k_data(base())
  common.mnist5k_unet(c)
  common.rectified_flow(c, sample_steps=32, guidance=0.0)  # w baked in: no CFG at sampling
  c.task = "progressive"
  c.sample.sampler = "ddim"
  c.diffusion.label_dropout = 0.0
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.train.update(num_steps=2000, log_every=100, checkpoint_every=1000, ema_decay=0.999)
  return c
