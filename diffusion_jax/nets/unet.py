"""The U-Net denoiser (DDPM, Ho et al. 2020; ADM, Dhariwal & Nichol 2021),
with optional text conditioning by cross-attention (Rombach et al. 2022, LDM / Stable
Diffusion).

x [B, H, W, C], t [B] ∈ [0, 1], labels [B] → prediction [B, H, W, C]. An optional
`cond` [B, H, W, C'] is concatenated to x as extra input channels (the
super-resolution stage of a cascade conditions on its upsampled low-res image this
way; Saharia et al. 2021, Ho et al. 2022).

Down path of `len(channel_mult)` levels with `num_res_blocks` residual blocks each,
self-attention at the resolutions in `attn_resolutions`, a middle block (res, attn,
res), and an up path with skip connections. Residual blocks see the timestep (+ class,
+ pooled text) embedding e either by adaptive group normalisation (ADM,
`scale_shift_norm=True`): GroupNorm(h)·(1 + s) + b with [s, b] = Dense(SiLU(e)), or
additively (DDPM, False): GroupNorm(h + Dense(SiLU(e))) after the first convolution.
Resolution changes between levels are a stride-2 convolution / nearest ×2 + 3×3
convolution, or (`resblock_updown=True`, ADM after BigGAN) residual blocks that
resample inside. Attention has `num_heads` heads, or channels // `num_head_channels`
(ADM) when that is > 0.

Text conditioning: with `text` [B, M, Dc] (token features, `text_mask` [B, M] True on
real tokens) every attention block — at `attn_resolutions` and in the middle — is
self-attention followed by cross-attention of the image tokens to the text tokens
(pre-LayerNorm, zero-initialised output, residual); `text_pooled` [B, Dp] is added to
the embedding through a Dense layer. These layers exist only when the inputs are
given, so a model built without text has exactly the parameters it always had.

Guidance input (`guidance_input=True`, a guidance-distilled student; Meng et al. 2023
§4.1): the keyword `guidance` w [B] is embedded like t (sinusoidal features, an MLP
whose last layer is zero-initialised, `layers.GuidanceEmbedding`) and added to the
time embedding; without the switch the network has no such parameters and refuses the
keyword.

Classes 0..num_classes−1 are real; index num_classes is the null class used for
classifier-free guidance. The output convolution (and every residual branch's last
layer) is zero-initialised, so a fresh model predicts exactly 0.
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.nets.layers import (Attention, SelfAttention2D, _groups, add_guidance,
                                       maybe_remat, timestep_embedding)


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
  """Heads of an attention layer over `channels`: channels // num_head_channels when
  that is > 0 (ADM: fixed head width, 64), else num_heads (DDPM: 1; ours: 4)."""
  if num_head_channels > 0:
    if channels % num_head_channels:
      raise ValueError(f"model.num_head_channels={num_head_channels} does not divide the "
                       f"{channels} channels of an attention layer")
    return channels // num_head_channels
  return num_heads


def resample(x, mode: str):
  """x [B, H, W, C] → [B, H/2, W/2, C] by 2×2 average pooling ('down') or
  [B, 2H, 2W, C] by nearest-neighbour repetition ('up'); '' is the identity."""
  if mode == "down":
    if x.shape[1] % 2 or x.shape[2] % 2:
      raise ValueError(f"resblock_updown: cannot halve a {x.shape[1]}×{x.shape[2]} map "
                       f"(shape {x.shape})")
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  if mode == "up":
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x


class ResBlock(nn.Module):
  """Residual block x [B, H, W, Cin], emb [B, E] → [B, H', W', out_channels].

  h = Conv(SiLU(GN(x)));  scale_shift_norm: h = GN(h)·(1 + s) + b, [s, b] = Dense(SiLU(emb))
  (ADM's AdaGN, eq. in §3 of Dhariwal & Nichol), else h = GN(h + Dense(SiLU(emb))) (DDPM);
  out = skip(x) + Conv₀(Dropout(SiLU(h))) with Conv₀ zero-initialised and skip a 1×1
  projection when Cin ≠ out_channels. `updown` 'down' / 'up' (ADM's BigGAN-style block)
  resamples h after the first GN + SiLU, before the first conv, and the skip x by
  average pooling / nearest repetition (H' = H/2 or 2H).
  """
  out_channels: int
  dropout: float = 0.0
  scale_shift_norm: bool = True
  updown: str = ""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    if self.updown not in ("", "up", "down"):
      raise ValueError(f"ResBlock updown={self.updown!r}: expected '', 'up' or 'down'")
    conv = lambda c, **kw: nn.Conv(c, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, **kw)
    norm = lambda c: nn.GroupNorm(_groups(c), dtype=jnp.float32, param_dtype=self.param_dtype)
    h = nn.silu(norm(x.shape[-1])(x))
    h, x = resample(h, self.updown), resample(x, self.updown)
    h = conv(self.out_channels)(h)
    width = (2 if self.scale_shift_norm else 1) * self.out_channels
    e = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype)(
        nn.silu(emb))[:, None, None, :]
    if self.scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = norm(self.out_channels)(h) * (1 + scale) + shift
    else:
      h = norm(self.out_channels)(h + e)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(self.out_channels, kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return (x + h).astype(self.dtype)


class CrossAttention2D(nn.Module):
  """x [B, H, W, C] attends to context [B, M, Dc] (mask [B, M], True = real token):
  x + Attention(LN(x) tokens, context), output projection zero-initialised (the
  cross-attention layer of LDM's transformer block, Rombach et al. 2022)."""
  num_heads: int
  implementation: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context, mask=None):
    B, H, W, C = x.shape
    if context.ndim != 3 or context.shape[0] != B:
      raise ValueError(f"text must be [B={B}, M, D] token features, got shape {context.shape}")
    if mask is not None and mask.shape != context.shape[:2]:
      raise ValueError(f"text_mask must be [B, M] = {context.shape[:2]}, got {mask.shape}")
    h = nn.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype)(x.reshape(B, H * W, C))
    out = Attention(self.num_heads, zero_init_out=True, implementation=self.implementation,
                    dtype=self.dtype, param_dtype=self.param_dtype)(
                        h.astype(self.dtype), context.astype(self.dtype), mask)
    return x + out.reshape(B, H, W, C).astype(x.dtype)


class UNet(nn.Module):
  """See the module docstring. `remat` ('' | nothing | dots | dots_no_batch |
  everything) recomputes each residual / attention block in the backward pass under
  that `jax.checkpoint` policy; parameters and outputs are unchanged."""
  out_channels: int
  channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 4
  dropout: float = 0.0
  num_classes: int = 0
  scale_shift_norm: bool = True
  num_head_channels: int = 0
  resblock_updown: bool = False
  remat: str = ""
  attention_impl: str | None = None
  guidance_input: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, t, labels=None, *, cond=None, text=None, text_mask=None,
               text_pooled=None, guidance=None, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb_dim = 4 * self.channels
    emb = timestep_embedding(t, self.channels)
    emb = nn.Dense(emb_dim, **kw)(nn.silu(nn.Dense(emb_dim, **kw)(emb)))
    emb = add_guidance(emb, guidance, self.guidance_input, self.channels, "UNet", **kw)
    if self.num_classes:
      if labels is None:
        raise ValueError("this UNet is class-conditional (num_classes > 0): pass labels")
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim, **kw)(labels)
    if text_pooled is not None:
      if text_pooled.ndim != 2 or text_pooled.shape[0] != x.shape[0]:
        raise ValueError(f"text_pooled must be [B={x.shape[0]}, D], got {text_pooled.shape}")
      emb = emb + nn.Dense(emb_dim, name="text_pooled_proj", **kw)(
          text_pooled.astype(self.dtype))
    if text is None and text_mask is not None:
      raise ValueError("text_mask given without text")

    # Explicit names (the ones flax would pick) so that nn.remat's wrapper classes
    # leave the parameter tree as it is without remat.
    res_cls = maybe_remat(ResBlock, self.remat, static_argnums=(3,))  # (self, x, emb, train)
    attn_cls = maybe_remat(SelfAttention2D, self.remat)
    cross_cls = maybe_remat(CrossAttention2D, self.remat)
    n_res, n_attn = itertools.count(), itertools.count()

    def res(h, ch, updown=""):
      return res_cls(ch, dropout=self.dropout, scale_shift_norm=self.scale_shift_norm,
                     updown=updown, name=f"ResBlock_{next(n_res)}", **kw)(h, emb, train)

    def attn(h):
      i = next(n_attn)
      heads = attention_heads(h.shape[-1], self.num_heads, self.num_head_channels)
      h = attn_cls(heads, implementation=self.attention_impl, name=f"SelfAttention2D_{i}",
                   **kw)(h)
      if text is not None:
        h = cross_cls(heads, implementation=self.attention_impl, name=f"CrossAttention2D_{i}",
                      **kw)(
            h, text, text_mask)
      return h

    def block(h, ch):
      h = res(h, ch)
      return attn(h) if h.shape[1] in self.attn_resolutions else h

    if cond is not None:  # image conditioning (super-resolution): extra input channels
      x = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)
    h = nn.Conv(self.channels, (3, 3), **kw)(x.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = block(h, self.channels * mult)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = res(h, h.shape[-1], "down")
        else:
          h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), **kw)(h)
        skips.append(h)

    h = res(h, h.shape[-1])
    h = attn(h)
    h = res(h, h.shape[-1])

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = block(jnp.concatenate([h, skips.pop()], axis=-1), self.channels * mult)
      if level:
        if self.resblock_updown:
          h = res(h, h.shape[-1], "up")
        else:
          h = nn.Conv(h.shape[-1], (3, 3), **kw)(resample(h, "up"))  # nearest ×2 + conv

    h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]), dtype=jnp.float32,
                             param_dtype=self.param_dtype)(h))
    out = nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros, **kw)(h)
    return out.astype(jnp.float32)
