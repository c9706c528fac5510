"""CLIP on the embedded 8×8 digits: captions from the labels ("a handwritten 7", "the
number seven", ...; data/text.py), a 2-block text transformer and a 2-block ViT
(2×2 patches, class token), width 32, CLIP's softmax loss. Trains in well under a minute on CPU:

  diffusion-jax-train --config=configs/digits_clip.py --workdir=/tmp/digits_clip
  python launch/clip_retrieval.py --workdir=/tmp/digits_clip

SigLIP instead: --config.clip.loss=siglip. No sample grids (nothing to generate);
docs/clip.md has the measured held-out retrieval.
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.task = "clip"
  c.data.name = "sklearn_digits"
  c.data.batch_size = 64
  c.text.max_length = 32
  c.clip.loss = "clip"
  c.clip.embed_dim = 32
  c.clip.text_width = 32
  c.clip.text_depth = 2
  c.clip.text_heads = 4
  c.clip.vision_width = 32
  c.clip.vision_depth = 2
  c.clip.vision_heads = 4
  c.clip.patch_size = 2
  c.optim.lr = 3e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 10
  c.train.num_steps = 400
  c.train.log_every = 50
  c.train.checkpoint_every = 0
  c.train.ema_decay = 0.99
  c.sample.per_class = 0
  return c
