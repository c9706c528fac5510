"""Layers shared by the denoiser networks."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(t, dim: int, max_period: float = 10000.0, scale: float = 1000.0):
  """Sinusoidal embedding of t [B] → [B, dim] (Vaswani et al.; DDPM's U-Net).

  t ∈ [0, 1] is multiplied by `scale` so that frequencies match the usual integer
  timesteps 0..1000: emb = [cos(scale·t·ω_k), sin(scale·t·ω_k)], ω_k = P^(−k/(dim/2)).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = scale * t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class SelfAttention2D(nn.Module):
  """Multi-head self-attention over the H·W positions of x [B, H, W, C] (pre-norm,
  residual, zero-initialised output projection). Uses jax.nn.dot_product_attention,
  which dispatches to cuDNN flash attention on GPU."""
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    if C % self.num_heads:
      raise ValueError(f"attention channels {C} not divisible by num_heads={self.num_heads}")
    h = nn.GroupNorm(num_groups=_groups(C), dtype=jnp.float32, param_dtype=self.param_dtype)(x)
    qkv = nn.DenseGeneral((3, self.num_heads, C // self.num_heads), dtype=self.dtype,
                          param_dtype=self.param_dtype, name="qkv")(h.reshape(B, H * W, C))
    q, k, v = (qkv[:, :, i] for i in range(3))
    out = jax.nn.dot_product_attention(q, k, v)
    out = nn.DenseGeneral(C, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.initializers.zeros, name="out")(out)
    return x + out.reshape(B, H, W, C).astype(x.dtype)


def _groups(channels: int) -> int:
  """GroupNorm groups: 32 as in DDPM when channels allow, else the largest divisor ≤ 32."""
  return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)
