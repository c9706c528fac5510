"""A noise-conditional image classifier p(y | x_t, t): the U-Net's encoder half (ADM's
EncoderUNet, Dhariwal & Nichol 2021, used for classifier guidance) with mean pooling
and a linear head.

x [B, H, W, C], t [B] ∈ [0, 1] → logits [B, num_classes]; with `features=True`
(logits, pooled features [B, D]) (the feature space of the domain Fréchet distance,
`evaluation/`). Trained at t = 0 only, it is a clean-image classifier.

The U-Net's block options apply as there: `scale_shift_norm` (AdaGN / additive
embedding), `num_head_channels`, `resblock_updown` (downsampling residual blocks),
`remat` (per-block rematerialisation) and `attention_impl`.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.nets.layers import SelfAttention2D, _groups, maybe_remat, timestep_embedding
from diffusion_jax.nets.unet import ResBlock, attention_heads


class Classifier(nn.Module):
  num_classes: int
  channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 4
  dropout: float = 0.0
  scale_shift_norm: bool = True
  num_head_channels: int = 0
  resblock_updown: bool = False
  remat: str = ""
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, *, train: bool = False, features: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb_dim = 4 * self.channels
    emb = timestep_embedding(t, self.channels)
    emb = nn.Dense(emb_dim, **kw)(nn.silu(nn.Dense(emb_dim, **kw)(emb)))
    # Explicit names (flax's own) keep the parameter tree the same under nn.remat.
    res_cls = maybe_remat(ResBlock, self.remat, static_argnums=(3,))  # (self, x, emb, train)
    attn_cls = maybe_remat(SelfAttention2D, self.remat)
    n_res, n_attn = itertools.count(), itertools.count()

    def res(h, ch, updown=""):
      return res_cls(ch, dropout=self.dropout, scale_shift_norm=self.scale_shift_norm,
                     updown=updown, name=f"ResBlock_{next(n_res)}", **kw)(h, emb, train)

    def attn(h):
      heads = attention_heads(h.shape[-1], self.num_heads, self.num_head_channels)
      return attn_cls(heads, implementation=self.attention_impl,
                      name=f"SelfAttention2D_{next(n_attn)}", **kw)(h)

    h = nn.Conv(self.channels, (3, 3), **kw)(x.astype(self.dtype))
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res(h, self.channels * mult)
        if h.shape[1] in self.attn_resolutions:
          h = attn(h)
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = res(h, h.shape[-1], "down")
        else:
          h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), **kw)(h)
    h = res(h, h.shape[-1])
    h = attn(h)
    h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]), dtype=jnp.float32,
                             param_dtype=self.param_dtype)(h))
    pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype)(pooled)
    return (logits, pooled) if features else logits
