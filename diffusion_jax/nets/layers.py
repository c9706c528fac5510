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


class GuidanceEmbedding(nn.Module):
  """The guidance weight w [B] → [B, features]: sinusoidal features of w (the
  timestep's, `timestep_embedding(w, sinusoid_dim)`), Dense → SiLU → Dense, the last
  layer zero-initialised — the w input of a guidance-distilled student (Meng et al.
  2023, "On Distillation of Guided Diffusion Models", §4.1: w embedded like t and added
  to the time embedding). Zero at initialisation, so a network given this input starts
  exactly as the network without it."""
  features: int
  sinusoid_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, w):
    if w.ndim != 1:
      raise ValueError(f"guidance must be the per-example weight w [B], got shape {w.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Dense(self.features, name="fc1", **kw)(timestep_embedding(w, self.sinusoid_dim))
    return nn.Dense(self.features, kernel_init=nn.initializers.zeros, name="fc2", **kw)(
        nn.silu(h))


def add_guidance(emb, guidance, guidance_input: bool, sinusoid_dim: int, what: str, **kw):
  """emb [B, E] + GuidanceEmbedding(w) when the network has a guidance input (inside a
  compact module: the submodule is named `guidance_embedder`); emb itself, untouched,
  when it has none. Raises naming model.guidance_input when the keyword `guidance` and
  the switch disagree."""
  if not guidance_input:
    if guidance is not None:
      raise ValueError(f"this {what} has no guidance input (model.guidance_input=False): "
                       "do not pass guidance=")
    return emb
  if guidance is None:
    raise ValueError(f"this {what} takes the guidance weight as an input "
                     "(model.guidance_input=True): pass guidance=w [B]")
  w = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), emb.shape[:1])
  return emb + GuidanceEmbedding(emb.shape[-1], sinusoid_dim, name="guidance_embedder",
                                 **kw)(w).astype(emb.dtype)


class SelfAttention2D(nn.Module):
  """Multi-head self-attention over the H·W positions of x [B, H, W, C] (pre-norm,
  residual, zero-initialised output projection). Uses jax.nn.dot_product_attention,
  which dispatches to cuDNN flash attention on GPU (`implementation`: None / 'xla' /
  'cudnn', its argument; cuDNN needs a bfloat16/float16 compute dtype)."""
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    if C % self.num_heads:
      raise ValueError(f"attention channels {C} not divisible by num_heads={self.num_heads}")
    h = nn.GroupNorm(num_groups=_groups(C), dtype=jnp.float32, param_dtype=self.param_dtype)(x)
    qkv = nn.DenseGeneral((3, self.num_heads, C // self.num_heads), dtype=self.dtype,
                          param_dtype=self.param_dtype, name="qkv")(h.reshape(B, H * W, C))
    q, k, v = (qkv[:, :, i] for i in range(3))
    out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
    out = nn.DenseGeneral(C, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.initializers.zeros, name="out")(out)
    return x + out.reshape(B, H, W, C).astype(x.dtype)


def _groups(channels: int) -> int:
  """GroupNorm groups: 32 as in DDPM when channels allow, else the largest divisor ≤ 32."""
  return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


class Attention(nn.Module):
  """Multi-head attention of tokens x [B, N, D] to `context` [B, M, Dc] (self-attention
  when context is None): softmax(q kᵀ/√h) v over heads of width h = D / num_heads,
  then an output projection (timm's / DiT's Attention; cross-attention as in Stable
  Diffusion and PixArt-α).

  mask [B, M] (True = attend) hides padded context tokens; is_causal (self-attention)
  also hides keys after the query (token i attends to j ≤ i). Softmax is float32 inside
  `jax.nn.dot_product_attention` whatever the compute dtype; `implementation` is its
  argument (None: XLA, 'cudnn': cuDNN flash attention on GPU, bf16/fp16 only).
  """
  num_heads: int
  qkv_bias: bool = True
  zero_init_out: bool = False
  is_causal: bool = False
  implementation: str | None = None
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    D = x.shape[-1]
    if D % self.num_heads:
      raise ValueError(f"attention width {D} not divisible by num_heads={self.num_heads}")
    heads = (self.num_heads, D // self.num_heads)
    dense = lambda features, name, **kw: nn.DenseGeneral(
        features, use_bias=self.qkv_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, name=name, **kw)
    if context is None:
      q, k, v = jnp.moveaxis(dense((3,) + heads, "qkv")(x), -3, 0)
    else:
      q = dense(heads, "q")(x)
      k, v = jnp.moveaxis(dense((2,) + heads, "kv")(context), -3, 0)
    if mask is not None:
      mask = mask[:, None, None, :].astype(bool)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.is_causal,
                                       implementation=self.implementation)
    kernel_init = nn.initializers.zeros if self.zero_init_out else self.kernel_init
    return nn.DenseGeneral(D, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                           kernel_init=kernel_init, name="proj")(out)


class Mlp(nn.Module):
  """Dense(hidden) → GELU (tanh approximation, as DiT/ViT) → Dense(out, default D)."""
  hidden: int
  out: int | None = None
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
    h = nn.gelu(nn.Dense(self.hidden, name="fc1", **kw)(x), approximate=True)
    return nn.Dense(self.out or x.shape[-1], name="fc2", **kw)(h)


REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "everything": jax.checkpoint_policies.everything_saveable,
}


def maybe_remat(module_cls, policy: str, **kw):
  """nn.remat(module_cls) with a named policy of what to keep for the backward pass
  ('' : no rematerialisation). Recomputing a block's activations trades FLOPs for
  memory; parameters and outputs are unchanged."""
  if not policy:
    return module_cls
  if policy not in REMAT_POLICIES:
    raise ValueError(f"model.remat={policy!r}: expected '' or one of {sorted(REMAT_POLICIES)}")
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], **kw)
