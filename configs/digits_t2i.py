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
from diffusion_jax_configs import common


def get_config():
  c = common.digits_data(base())
  common.digits_unet(c)
  c.model.class_conditional = False  # captions only: labels are not embedded
  c.model.text_attention = "cross"
  c.text.encoder = "clip"
  c.text.max_length = 32
  common.rectified_flow(c, sample_steps=32)
  common.quickstart_training(c)
  return c
