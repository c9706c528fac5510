"""Progressive distillation of the quickstart model (Salimans & Ho 2022): a student that
does in one DDIM step what the quickstart run does in two, with its CFG weight w = 1
baked in (the teacher's sample.guidance). One round of the chain 16 → 8 → 4 → 2 → 1 (`launch/progressive.py` runs all):

  diffusion-jax-train --config=configs/digits_progressive.py --workdir=/tmp/pd16 \
      --config.distill.teacher=/tmp/quickstart --config.sample.num_steps=16
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.digits_data(base())
  common.digits_unet(c)
  common.rectified_flow(c, sample_steps=16, guidance=0.0)  # w baked in: no CFG at sampling
  c.task = "progressive"
  # distill.guidance None: the teacher's own sample.guidance (the quickstart's w = 1 for
  # the first round; each student samples with w = 0 and passes that on)
  c.progressive.weighting = "truncated_snr"
  c.sample.sampler = "ddim"
  c.diffusion.label_dropout = 0.0         # a guided (w baked in) student is conditional only
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  c.train.num_steps = 400
  c.train.log_every = 100
  c.train.checkpoint_every = 400
  c.train.ema_decay = 0.99
  return c
