"""A noise-conditional image classifier p(y | x_t, t): the U-Net's encoder half (ADM's
EncoderUNet, Dhariwal & Nichol 2021, used for classifier guidance) with mean pooling
and a linear head.

x [B, H, W, C], t [B] ∈ [0, 1] → logits [B, num_classes]; with `features=True`
(logits, pooled features [B, D]) (the feature space of the domain Fréchet distance,
`evaluation/`). Trained at t = 0 only, it is a clean-image classifier.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.nets.layers import SelfAttention2D, _groups, timestep_embedding
from diffusion_jax.nets.unet import ResBlock


class Classifier(nn.Module):
  num_classes: int
  channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, *, train: bool = False, features: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb_dim = 4 * self.channels
    emb = timestep_embedding(t, self.channels)
    emb = nn.Dense(emb_dim, **kw)(nn.silu(nn.Dense(emb_dim, **kw)(emb)))
    h = nn.Conv(self.channels, (3, 3), **kw)(x.astype(self.dtype))
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.channels * mult, self.dropout, **kw)(h, emb, train)
        if h.shape[1] in self.attn_resolutions:
          h = SelfAttention2D(self.num_heads, **kw)(h)
      if level != len(self.channel_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), **kw)(h)
    h = ResBlock(h.shape[-1], self.dropout, **kw)(h, emb, train)
    h = SelfAttention2D(self.num_heads, **kw)(h)
    h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]), dtype=jnp.float32,
                             param_dtype=self.param_dtype)(h))
    pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype)(pooled)
    return (logits, pooled) if features else logits
