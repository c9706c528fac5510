"""CLIP on the embedded 8×8 digits: captions from the labels ("a handwritten 7", "the
number seven", ...; data/text.py), a 2-block text transformer and a 2-block ViT
(2×2 patches, class token), width 32, CLIP's softmax loss. Trains in well under a minute on CPU:

  diffusion-jax-train --config=configs/digits_clip.py --workdir=/tmp/digits_clip
  python launch/clip_retrieval.py --workdir=/tmp/digits_clip

SigLIP instead: --config.clip.loss=siglip. No sample grids (nothing to generate);
docs/clip.md has the measured held-out retrieval.
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.digits_data(base(), batch_size=64)
  c.task = "clip"
  c.text.max_length = 32
  c.clip.loss = "clip"
  c.clip.embed_dim = 32
  c.clip.update(text_width=32, text_depth=2, text_heads=4)
  c.clip.update(vision_width=32, vision_depth=2, vision_heads=4, patch_size=2)
  c.optim.update(lr=3e-3, weight_decay=1e-4, warmup_steps=10)
  c.train.update(num_steps=400, log_every=50, checkpoint_every=0, ema_decay=0.99)
  c.sample.per_class = 0
  return c
