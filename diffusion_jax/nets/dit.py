"""The Diffusion Transformer (DiT, Peebles & Xie 2023), with text conditioning
by cross-attention (PixArt-α) or MMDiT-style joint attention (SD3, Esser et al. 2024).

x [B, H, W, C], t [B] ∈ [0, 1], labels [B] → prediction [B, H, W, out_channels].

  tokens  = patchify(x) (a p×p stride-p conv) + fixed 2-D sin-cos position embedding
  c       = MLP(sinusoid_256(1000·t)) + Embed(label) (+ MLP(text_pooled))
            (+ MLP₀(sinusoid_256(1000·w)): `guidance_input`, Meng et al. 2023 §4.1,
             the guidance weight w [B] as the keyword `guidance`; last layer zero-init)
  block   : x += gate₁ · Attn(LN(x)(1 + scale₁) + shift₁)
            [x += CrossAttn(LN(x), text)]                                (cross)
            x += gate₂ · MLP(LN(x)(1 + scale₂) + shift₂)
            (shift, scale, gate)₁,₂ = Dense(SiLU(c))   — adaLN-Zero: zero-initialised
  output  = unpatchify(Dense(LN(x)(1 + scale) + shift))                  (zero-initialised)

so a fresh model predicts exactly 0. Labels 0..num_classes−1 are classes, index
num_classes the null class of classifier-free guidance. In `joint` mode the text tokens
are a second stream with their own adaLN modulation, projections and MLP; both streams
attend over their concatenation.

Sizes by name (`VARIANTS`, the paper's Table 1): S/B/L/XL × patch 2/4/8, e.g. DiT-XL/2
(hidden 1152, depth 28, 16 heads). `scan=True` runs the blocks as one `nn.scan` (block
parameters stacked on a leading depth axis: one compiled block, same outputs); `remat`
rematerialises each block's activations in the backward pass (`layers.REMAT_POLICIES`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.nets.layers import (Attention, Mlp, add_guidance, maybe_remat,
                                       timestep_embedding)

VARIANTS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def variant(name: str) -> dict:
  """'XL/2' → dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)."""
  size, _, patch = name.partition("/")
  if size not in VARIANTS or patch not in ("2", "4", "8"):
    raise ValueError(f"model.variant={name!r}: expected <S|B|L|XL>/<2|4|8>, e.g. 'XL/2'")
  hidden, depth, heads = VARIANTS[size]
  return dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(patch))


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [h·w, dim] (MAE's, as DiT uses it): half the
  channels embed the row index, half the column, each as [sin(pos·ω_k), cos(pos·ω_k)]
  with ω_k = 10000^(−k/(dim/4))."""
  if dim % 4:
    raise ValueError(f"DiT hidden_size {dim} must be divisible by 4")

  def one_d(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
  return np.concatenate([one_d(grid_h), one_d(grid_w)], axis=1).astype(np.float32)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(x, name=None):
  """LayerNorm without affine parameters (DiT's), computed in float32."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=jnp.float32,
                      name=name)(x.astype(jnp.float32))


class DiTBlock(nn.Module):
  """One adaLN-Zero block. carry = (x [B,N,D], ctx [B,M,D] or None) → (carry, None),
  the signature nn.scan needs; c [B,D] and ctx_mask [B,M] are broadcast."""
  num_heads: int
  mlp_ratio: float = 4.0
  text_attention: str = "cross"
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, c, ctx_mask):
    x, ctx = carry
    D = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(num_heads=self.num_heads, implementation=self.attention_impl,
                   kernel_init=_xavier, **kw)
    mlp = lambda name: Mlp(int(D * self.mlp_ratio), kernel_init=_xavier, name=name, **kw)
    adaln = lambda name: jnp.split(nn.Dense(6 * D, kernel_init=_zeros, name=name, **kw)(
        nn.silu(c)), 6, axis=-1)

    shift1, scale1, gate1, shift2, scale2, gate2 = adaln("adaLN_modulation")
    h = _modulate(_layer_norm(x), shift1, scale1).astype(self.dtype)

    if ctx is not None and self.text_attention == "joint":
      # MMDiT: a text stream with its own weights; attention over [image; text].
      cs1, cc1, cg1, cs2, cc2, cg2 = adaln("ctx_adaLN_modulation")
      hc = _modulate(_layer_norm(ctx), cs1, cc1).astype(self.dtype)
      heads = (self.num_heads, D // self.num_heads)
      qkv = lambda name, a: jnp.moveaxis(nn.DenseGeneral(
          (3,) + heads, kernel_init=_xavier, name=name, **kw)(a), -3, 0)
      (q, k, v), (qc, kc, vc) = qkv("qkv", h), qkv("ctx_qkv", hc)
      mask = jnp.concatenate([jnp.ones(x.shape[:2], bool), ctx_mask.astype(bool)], axis=1)
      out = jax.nn.dot_product_attention(
          jnp.concatenate([q, qc], 1), jnp.concatenate([k, kc], 1),
          jnp.concatenate([v, vc], 1), mask=mask[:, None, None, :],
          implementation=self.attention_impl)
      proj = lambda name, a: nn.DenseGeneral(D, axis=(-2, -1), kernel_init=_xavier,
                                             name=name, **kw)(a)
      N = x.shape[1]
      x = x + gate1[:, None] * proj("proj", out[:, :N])
      ctx = ctx + cg1[:, None] * proj("ctx_proj", out[:, N:])
      hc = _modulate(_layer_norm(ctx), cs2, cc2).astype(self.dtype)
      ctx = ctx + cg2[:, None] * mlp("ctx_mlp")(hc)
    else:
      x = x + gate1[:, None] * Attention(name="attn", **attn_kw)(h)
      if ctx is not None:  # cross-attention to the text tokens (PixArt-α)
        hx = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=self.param_dtype,
                          name="norm_cross")(x.astype(jnp.float32)).astype(self.dtype)
        x = x + Attention(name="cross_attn", zero_init_out=True, **attn_kw)(hx, ctx, ctx_mask)
    h = _modulate(_layer_norm(x), shift2, scale2).astype(self.dtype)
    x = x + gate2[:, None] * mlp("mlp")(h)
    return (x.astype(self.dtype), None if ctx is None else ctx.astype(self.dtype)), None


class DiT(nn.Module):
  out_channels: int
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  patch_size: int = 2
  mlp_ratio: float = 4.0
  num_classes: int = 0
  text_attention: str = "cross"
  scan: bool = False
  remat: str = ""
  attention_impl: str | None = None
  guidance_input: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, labels=None, *, cond=None, text=None, text_mask=None,
               text_pooled=None, guidance=None, train: bool = False):
    del train  # DiT has no dropout; label dropout (CFG) happens in the loss.
    B, H, W, _ = x.shape
    p, D = self.patch_size, self.hidden_size
    if H % p or W % p:
      raise ValueError(f"image size {H}×{W} is not divisible by model.patch_size={p}")
    if self.text_attention not in ("cross", "joint"):
      raise ValueError(f"model.text_attention={self.text_attention!r}: expected cross | joint")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    std02 = nn.initializers.normal(0.02)

    if cond is not None:  # image conditioning: extra input channels
      x = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)
    patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                  in_axis=(0, 1, 2), out_axis=-1)
    h = nn.Conv(D, (p, p), strides=(p, p), padding="VALID", kernel_init=patch_init,
                name="x_embedder", **kw)(x.astype(self.dtype))
    h = h.reshape(B, -1, D) + sincos_pos_embed_2d(D, H // p, W // p)[None]

    c = timestep_embedding(t, 256)
    c = nn.Dense(D, kernel_init=std02, name="t_embedder_1", **kw)(c)
    c = nn.Dense(D, kernel_init=std02, name="t_embedder_2", **kw)(nn.silu(c))
    c = add_guidance(c, guidance, self.guidance_input, 256, "DiT", **kw)
    if self.num_classes:
      if labels is None:
        raise ValueError("this DiT is class-conditional (num_classes > 0): pass labels")
      c = c + nn.Embed(self.num_classes + 1, D, embedding_init=std02, name="y_embedder",
                       **kw)(labels)
    if text_pooled is not None:
      c = c + Mlp(D, D, kernel_init=_xavier, name="pooled_embedder", **kw)(
          text_pooled.astype(self.dtype))
    ctx = None
    if text is not None:
      ctx = nn.Dense(D, kernel_init=_xavier, name="context_embedder", **kw)(
          text.astype(self.dtype))
      text_mask = (jnp.ones(text.shape[:2], bool) if text_mask is None
                   else text_mask.astype(bool))

    block_kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    text_attention=self.text_attention, attention_impl=self.attention_impl, **kw)
    block = maybe_remat(DiTBlock, self.remat, prevent_cse=not self.scan)
    carry = (h.astype(self.dtype), ctx)
    if self.scan:
      blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=self.depth)
      carry, _ = blocks(name="blocks", **block_kw)(carry, c, text_mask)
    else:
      for i in range(self.depth):
        carry, _ = block(name=f"blocks_{i}", **block_kw)(carry, c, text_mask)
    h = carry[0]

    shift, scale = jnp.split(nn.Dense(2 * D, kernel_init=_zeros, name="final_adaLN_modulation",
                                      **kw)(nn.silu(c)), 2, axis=-1)
    h = _modulate(_layer_norm(h), shift, scale).astype(self.dtype)
    h = nn.Dense(p * p * self.out_channels, kernel_init=_zeros, name="final_linear", **kw)(h)
    h = h.reshape(B, H // p, W // p, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(B, H, W, self.out_channels).astype(jnp.float32)


def unscanned_params(params, depth: int):
  """Scanned DiT params (blocks stacked on a leading axis) → blocks_0..blocks_{depth-1}."""
  params = dict(params)
  stacked = params.pop("blocks")
  for i in range(depth):
    params[f"blocks_{i}"] = jax.tree.map(lambda a: a[i], stacked)
  return params
