"""The U-Net denoiser (DDPM, Ho et al. 2020; ADM, Dhariwal & Nichol 2021; seed 002).

x [B, H, W, C], t [B] ∈ [0, 1], labels [B] → prediction [B, H, W, C]. An optional
`cond` [B, H, W, C'] is concatenated to x as extra input channels (the
super-resolution stage of a cascade conditions on its upsampled low-res image this
way; Saharia et al. 2021, Ho et al. 2022).

Down path of `len(channel_mult)` levels with `num_res_blocks` residual blocks each,
self-attention at the resolutions in `attn_resolutions`, a middle block, and an up path
with skip connections. Residual blocks are conditioned on the timestep (+ class)
embedding by adaptive group normalisation: GroupNorm(h)·(1 + scale) + shift (AdaGN).
Classes 0..num_classes−1 are real; index num_classes is the null class used for
classifier-free guidance. The output convolution is zero-initialised, so a fresh model
predicts exactly 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.nets.layers import SelfAttention2D, _groups, timestep_embedding


class ResBlock(nn.Module):
  out_channels: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool):
    conv = lambda c, **kw: nn.Conv(c, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, **kw)
    norm = lambda c: nn.GroupNorm(_groups(c), dtype=jnp.float32, param_dtype=self.param_dtype)
    h = conv(self.out_channels)(nn.silu(norm(x.shape[-1])(x)))
    scale, shift = jnp.split(
        nn.Dense(2 * self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype)(
            nn.silu(emb))[:, None, None, :], 2, axis=-1)
    h = norm(self.out_channels)(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.out_channels, kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return (x + h).astype(self.dtype)


class UNet(nn.Module):
  out_channels: int
  channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 4
  dropout: float = 0.0
  num_classes: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, labels=None, *, cond=None, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb_dim = 4 * self.channels
    emb = timestep_embedding(t, self.channels)
    emb = nn.Dense(emb_dim, **kw)(nn.silu(nn.Dense(emb_dim, **kw)(emb)))
    if self.num_classes:
      if labels is None:
        raise ValueError("this UNet is class-conditional (num_classes > 0): pass labels")
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim, **kw)(labels)

    def block(h, ch):
      h = ResBlock(ch, self.dropout, **kw)(h, emb, train)
      if h.shape[1] in self.attn_resolutions:
        h = SelfAttention2D(self.num_heads, **kw)(h)
      return h

    if cond is not None:  # image conditioning (super-resolution): extra input channels
      x = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)
    h = nn.Conv(self.channels, (3, 3), **kw)(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = block(h, self.channels * mult)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), **kw)(h)
        skips.append(h)

    h = ResBlock(h.shape[-1], self.dropout, **kw)(h, emb, train)
    h = SelfAttention2D(self.num_heads, **kw)(h)
    h = ResBlock(h.shape[-1], self.dropout, **kw)(h, emb, train)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = block(jnp.concatenate([h, skips.pop()], axis=-1), self.channels * mult)
      if level:
        B, H, W, C = h.shape
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour ×2
        h = nn.Conv(C, (3, 3), **kw)(h)

    h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]), dtype=jnp.float32,
                             param_dtype=self.param_dtype)(h))
    out = nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros, **kw)(h)
    return out.astype(jnp.float32)
