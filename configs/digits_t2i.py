"""Text-to-image on the embedded 8×8 digits: the quickstart's rectified-flow U-Net,
conditioned only on captions ("a handwritten 7", "the number seven", ...), through
cross-attention to the frozen text encoder of a clip run plus its pooled embedding.
Labels are not embedded; caption dropout (p = diffusion.label_dropout) trains the
empty-caption ∅ of classifier-free guidance. Train a clip run first:

  diffusion-jax-train --config=configs/digits_clip.py --workdir=/tmp/digits_clip
  diffusion-jax-train --config=configs/digits_t2i.py --workdir=/tmp/digits_t2i \
      --config.text.clip_workdir=/tmp/digits_clip
  diffusion-jax-sample --workdir=/tmp/digits_t2i --output=/tmp/t2i.npz --grid \
      --prompt="the number seven" --prompt="a handwritten 3"

Measured numbers: docs/text_to_image.md.
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.data.name = "sklearn_digits"
  c.data.batch_size = 128
  c.model.channels = 16
  c.model.channel_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.class_conditional = False
  c.model.text_attention = "cross"
  c.text.encoder = "clip"
  c.text.max_length = 32
  c.diffusion.path = "flow"
  c.diffusion.prediction = "velocity"
  c.diffusion.time_sampling = "logit_normal"
  c.sample.sampler = "euler"
  c.sample.num_steps = 32
  c.sample.guidance = 1.0
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.train.num_steps = 600
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.ema_decay = 0.995
  return c
