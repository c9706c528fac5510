"""A CLIP-style dual encoder (Radford et al. 2021): a text transformer
and a Vision Transformer (Dosovitskiy et al. 2020) projected into one embedding space.

Text, tokens [B, L] (data/text.py; 0 = PAD, L ≤ max_length):

    h = Embed(tokens) + P[:L]                          (learned positions)
    block: h += Attn(LN(h); causal ∧ not-PAD keys)      (pre-LN, GPT-2 / CLIP)
           h += MLP(LN(h))
    features = LN(h) [B, L, W];  pooled = features[b, eos_b] [B, W]

where eos_b, the EOS position, is the last non-PAD token (`data.text.encode` always ends
a caption with EOS). With the causal mask, token i's feature depends on tokens ≤ i only,
so padding never changes a caption's features or its pooled embedding.

Image, images [B, H, W, C] in [−1, 1], patch p:

    h = [cls; Conv_{p×p, stride p}(x)] + P              (class token, learned positions)
    h = LN_pre(h); pre-LN blocks (no mask); pooled = LN_post(h[:, 0]) [B, W]

(pool='cls' as in ViT and CLIP, the default; pool='mean' averages the patch tokens.)

Both pooled features go through a bias-free linear projection to embed_dim and are
L2-normalised. Similarity logits are τ·xᵀy (+ b) with a learned temperature
τ = exp(t): CLIP t₀ = log(1/0.07) and τ clipped at 100; SigLIP t₀ = log 10 and a
learned bias b₀ = −10 (Zhai et al. 2023). The temperature parameters stay float32 for
any param_dtype.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.data import text as text_lib
from diffusion_jax.nets.layers import Attention, Mlp, maybe_remat

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class Block(nn.Module):
  """Pre-LN transformer block: x += Attn(LN(x)); x += MLP(LN(x)). x [B, N, W], mask
  [B, N] (True = real token, attended as a key) or None."""
  num_heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)
    x = x + Attention(self.num_heads, is_causal=self.causal,
                      implementation=self.attention_impl, name="attn", **kw)(
                          ln("ln_1")(x), mask=mask)
    return x + Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp", **kw)(ln("ln_2")(x))


class TextTransformer(nn.Module):
  """tokens [B, L] int → (features [B, L, width], mask [B, L] bool, pooled [B, width])."""
  max_length: int
  width: int
  depth: int
  num_heads: int
  vocab_size: int = text_lib.VOCAB_SIZE
  remat: str = ""
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    B, L = tokens.shape
    if L > self.max_length:
      raise ValueError(f"text tokens of length {L} exceed config.text.max_length="
                       f"{self.max_length} (the text transformer's positions)")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mask = text_lib.padding_mask(tokens)
    h = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding", **kw)(tokens)
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (self.max_length, self.width), self.param_dtype)
    h = (h + pos[:L].astype(h.dtype)).astype(self.dtype)
    block = maybe_remat(Block, self.remat)
    for i in range(self.depth):
      h = block(self.num_heads, causal=True, attention_impl=self.attention_impl,
                name=f"blocks_{i}", **kw)(h, mask)
    features = nn.LayerNorm(epsilon=1e-5, name="ln_final", **kw)(h)
    eos = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)
    pooled = jnp.take_along_axis(features, eos[:, None, None], axis=1)[:, 0]
    return features, mask, pooled


class VisionTransformer(nn.Module):
  """images [B, H, W, C] → (tokens [B, 1 + HW/p², width], pooled [B, width])."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  pool: str = "cls"
  remat: str = ""
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    B, H, W, _ = images.shape
    p = self.patch_size
    if H % p or W % p:
      raise ValueError(f"image size {H}×{W} is not divisible by config.clip.patch_size={p}")
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"ViT pool={self.pool!r}: expected 'cls' or 'mean'")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                name="patch_embedding", **kw)(images.astype(self.dtype))
    h = h.reshape(B, -1, self.width)
    cls = self.param("class_embedding", nn.initializers.normal(0.02), (self.width,),
                     self.param_dtype)
    h = jnp.concatenate([jnp.broadcast_to(cls.astype(h.dtype), (B, 1, self.width)), h], 1)
    pos = self.param("positional_embedding", nn.initializers.normal(0.02),
                     (h.shape[1], self.width), self.param_dtype)
    h = nn.LayerNorm(epsilon=1e-5, name="ln_pre", **kw)(h + pos.astype(h.dtype))
    block = maybe_remat(Block, self.remat)
    for i in range(self.depth):
      h = block(self.num_heads, attention_impl=self.attention_impl, name=f"blocks_{i}",
                **kw)(h)
    pooled = h[:, 0] if self.pool == "cls" else jnp.mean(h[:, 1:], axis=1)
    return h, nn.LayerNorm(epsilon=1e-5, name="ln_post", **kw)(pooled)


class CLIP(nn.Module):
  """The dual encoder. `__call__(images, tokens) -> (img_emb [B, E], txt_emb [B, E],
  logit_scale [], logit_bias [])`, embeddings L2-normalised, logit_bias 0 for
  loss='clip'. Methods (use with `apply(..., method=CLIP.encode_text)`):
  `encode_text(tokens) -> (features [B, L, text_width], mask [B, L], pooled [B, E])`,
  `encode_image(images) -> [B, E]`, `temperature() -> (logit_scale, logit_bias)`."""
  embed_dim: int
  max_length: int
  text_width: int = 64
  text_depth: int = 2
  text_heads: int = 4
  vision_width: int = 64
  vision_depth: int = 2
  vision_heads: int = 4
  patch_size: int = 2
  pool: str = "cls"
  loss: str = "clip"
  remat: str = ""
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    if self.loss not in ("clip", "siglip"):
      raise ValueError(f"config.clip.loss={self.loss!r}: expected 'clip' or 'siglip'")
    kw = dict(remat=self.remat, attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype)
    self.text = TextTransformer(self.max_length, self.text_width, self.text_depth,
                                self.text_heads, **kw)
    self.vision = VisionTransformer(self.patch_size, self.vision_width, self.vision_depth,
                                    self.vision_heads, pool=self.pool, **kw)
    proj = lambda name: nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=name)
    self.text_projection, self.image_projection = proj("text_projection"), proj("image_projection")
    t0 = math.log(1 / 0.07) if self.loss == "clip" else math.log(10.0)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(t0), (), jnp.float32)
    if self.loss == "siglip":
      self.logit_bias = self.param("logit_bias", nn.initializers.constant(-10.0), (),
                                   jnp.float32)

  def encode_text(self, tokens):
    features, mask, pooled = self.text(tokens)
    return features, mask, _normalize(self.text_projection(pooled))

  def encode_image(self, images):
    _, pooled = self.vision(images)
    return _normalize(self.image_projection(pooled))

  def temperature(self):
    """(τ, b): CLIP τ = min(exp(t), 100), b = 0; SigLIP τ = exp(t'), b learned."""
    if self.loss == "clip":
      return jnp.minimum(jnp.exp(self.logit_scale), 100.0), jnp.zeros((), jnp.float32)
    return jnp.exp(self.logit_scale), self.logit_bias

  def __call__(self, images, tokens):
    _, _, txt = self.encode_text(tokens)
    scale, bias = self.temperature()
    return self.encode_image(images), txt, scale, bias


def from_config(config) -> CLIP:
  """config.clip (sizes, loss), config.text.max_length, config.model.{dtype,
  param_dtype, remat, attention_impl} → the CLIP module."""
  c = config.clip
  for key in ("model.dtype", "model.param_dtype"):
    name = config.model[key.split(".")[1]]
    if name not in _DTYPES:
      raise ValueError(f"config.{key}={name!r}: expected one of {sorted(_DTYPES)}")
  for width, heads, which in ((c.text_width, c.text_heads, "text"),
                              (c.vision_width, c.vision_heads, "vision")):
    if width % heads:
      raise ValueError(f"config.clip.{which}_width={width} is not divisible by "
                       f"config.clip.{which}_heads={heads}")
  return CLIP(embed_dim=c.embed_dim, max_length=config.text.max_length,
              text_width=c.text_width, text_depth=c.text_depth, text_heads=c.text_heads,
              vision_width=c.vision_width, vision_depth=c.vision_depth,
              vision_heads=c.vision_heads, patch_size=c.patch_size, loss=c.loss,
              remat=config.model.remat, attention_impl=config.model.attention_impl,
              dtype=_DTYPES[config.model.dtype],
              param_dtype=_DTYPES[config.model.param_dtype])


def encode_text(config, params, tokens):
  """A clip run's text encoder as a pure function (config: the clip run's own config;
  params: its `state.params` or `state.ema_params`).

  tokens: int32 [B, L] from `data.text.encode(captions, L)`, L ≤ config.text.max_length.
  Returns (features [B, L, config.clip.text_width] (after the final LayerNorm; use them
  as cross-attention context), mask [B, L] bool (True = real token), pooled
  [B, config.clip.embed_dim] (the projected EOS feature, L2-normalised: the embedding
  the contrastive loss compares with images)).
  """
  return from_config(config).apply({"params": params}, tokens, method=CLIP.encode_text)


def encode_image(config, params, images):
  """images [B, H, W, C] in [−1, 1] → L2-normalised embeddings [B, config.clip.embed_dim]."""
  return from_config(config).apply({"params": params}, images, method=CLIP.encode_image)
