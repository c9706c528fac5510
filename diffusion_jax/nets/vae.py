"""VAE encoders and decoders (stateless flax.linen; config.vae).

    encoder(x [B, H, W, C], labels [B] int32) -> (mean, logvar) [B, latent_dim]
        the diagonal-Gaussian posterior q(z | x) = N(mean, diag exp(logvar))
        (Kingma & Welling 2014, Appendix C.2)
    decoder(z [B, latent_dim], labels [B] int32) -> (loc, log_scale)
        loc [B, H, W, C]: the likelihood's location (Gaussian / logistic mean, or the
        Bernoulli logits); log_scale [B, H, W, C] for likelihoods with a learned scale
        (gaussian_learned, logistic), else None

Labels are ignored when `num_classes == 0`. Class-conditional networks (a conditional
VAE, Sohn et al. 2015) get a label embedding at their inputs: concatenated to the
flattened image (mlp encoder) or as one extra input channel, an embedded H×W map (conv
encoder), and concatenated to z (both decoders).

Networks (config.vae.network; width = config.vae.width, depth = config.vae.depth):
  mlp   flatten → [Dense(width), SiLU] × depth → Dense (encoder: 2·latent_dim; decoder:
        H·W·C per output). depth 0 gives the linear encoder and decoder of
        probabilistic PCA's VAE (Tipping & Bishop 1999; Lucas et al. 2019).
  conv  encoder: Conv 3×3 (width) → [Conv 4×4 /2 (width·2^i), SiLU] for i < depth →
        flatten → Dense(2·latent_dim); decoder the mirror: Dense to
        [H/2^depth, W/2^depth, width·2^(depth−1)] → [ConvT 4×4 /2, SiLU] × depth,
        halving the width to `width` → Conv 3×3 (C per output). H and W must divide by
        2^depth.

Every module computes in `dtype` with parameters in `param_dtype`; outputs are float32.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["ConvDecoder", "ConvEncoder", "LEARNED_SCALE", "MLPDecoder", "MLPEncoder",
           "NETWORKS", "build", "check_shape"]

NETWORKS = ("mlp", "conv")
# Likelihoods whose decoder also outputs a per-pixel log-scale.
LEARNED_SCALE = ("gaussian_learned", "logistic")


def _f32(x):
  return x.astype(jnp.float32)


def _split(out, latent_dim: int):
  """[B, 2·latent_dim] → (mean, logvar) [B, latent_dim] each, float32."""
  out = _f32(out)
  return out[:, :latent_dim], out[:, latent_dim:]


def _outputs(out, learned_scale: bool):
  """[..., P·C] → (loc [..., C], log_scale [..., C] or None), float32 (P = 2 with a
  learned scale)."""
  out = _f32(out)
  if not learned_scale:
    return out, None
  C = out.shape[-1] // 2
  return out[..., :C], out[..., C:]


def check_shape(image_shape, depth: int, network: str = "conv") -> tuple[int, int]:
  """(H/2^depth, W/2^depth) of the conv networks' lowest level; raises ValueError naming
  config.vae.network, config.vae.depth and the shape when H or W do not divide."""
  H, W = int(image_shape[0]), int(image_shape[1])
  f = 2 ** depth
  if H % f or W % f:
    raise ValueError(
        f"config.vae.network={network!r} with config.vae.depth={depth} halves the image "
        f"{depth} times: H and W must divide by {f}, got image shape {tuple(image_shape)} "
        f"(use a smaller config.vae.depth)")
  return H // f, W // f


def _mlp_trunk(m: nn.Module, h, labels):
  """The MLPs' shared trunk inside module m's compact call: h [B, D] (‖ Embed(y)
  [width] when m.num_classes) → [Dense(width), SiLU] × m.depth."""
  kw = dict(dtype=m.dtype, param_dtype=m.param_dtype)
  h = h.astype(m.dtype)
  if m.num_classes:
    h = jnp.concatenate([h, nn.Embed(m.num_classes, m.width, name="embed_y", **kw)(labels)],
                        axis=-1)
  for i in range(m.depth):
    h = nn.silu(nn.Dense(m.width, name=f"hidden_{i}", **kw)(h))
  return h


class MLPEncoder(nn.Module):
  """x [B, H, W, C] → flatten (‖ Embed(y) [width] when conditional) → [Dense(width),
  SiLU] × depth → Dense(2·latent_dim) → (mean, logvar) [B, latent_dim]."""
  latent_dim: int
  num_classes: int = 0
  width: int = 256
  depth: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels):
    h = _mlp_trunk(self, x.reshape(x.shape[0], -1), labels)
    out = nn.Dense(2 * self.latent_dim, name="out", dtype=self.dtype,
                   param_dtype=self.param_dtype)(h)
    return _split(out, self.latent_dim)


class MLPDecoder(nn.Module):
  """z [B, latent_dim] (‖ Embed(y) [width] when conditional) → [Dense(width), SiLU] ×
  depth → Dense(H·W·C·P) → (loc, log_scale | None) [B, H, W, C]; P = 2 with a learned
  scale."""
  image_shape: tuple[int, int, int]
  num_classes: int = 0
  width: int = 256
  depth: int = 2
  learned_scale: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, labels):
    h = _mlp_trunk(self, z, labels)
    P = 2 if self.learned_scale else 1
    out = nn.Dense(math.prod(self.image_shape) * P, name="out", dtype=self.dtype,
                   param_dtype=self.param_dtype)(h)
    H, W, C = self.image_shape
    # Channel-last layout [H, W, C·P]: the outputs of one pixel are adjacent.
    return _outputs(out.reshape(z.shape[0], H, W, C * P), self.learned_scale)


class ConvEncoder(nn.Module):
  """x [B, H, W, C] (‖ an embedded H×W class map as one more channel when conditional)
  → Conv 3×3 (width) → [Conv 4×4 /2 (width·2^i), SiLU] × depth → flatten →
  Dense(2·latent_dim) → (mean, logvar) [B, latent_dim]."""
  image_shape: tuple[int, int, int]
  latent_dim: int
  num_classes: int = 0
  width: int = 32
  depth: int = 2
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels):
    check_shape(self.image_shape, self.depth)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    H, W, _ = self.image_shape
    h = x.astype(self.dtype)
    if self.num_classes:
      y = nn.Embed(self.num_classes, H * W, name="embed_y", **kw)(labels)
      h = jnp.concatenate([h, y.reshape(x.shape[0], H, W, 1)], axis=-1)
    h = nn.silu(nn.Conv(self.width, (3, 3), padding="SAME", name="conv_in", **kw)(h))
    for i in range(self.depth):
      h = nn.silu(nn.Conv(self.width * 2 ** i, (4, 4), strides=(2, 2), padding="SAME",
                          name=f"down_{i}", **kw)(h))
    h = h.reshape(h.shape[0], -1)
    return _split(nn.Dense(2 * self.latent_dim, name="out", **kw)(h), self.latent_dim)


class ConvDecoder(nn.Module):
  """z [B, latent_dim] (‖ Embed(y) [width] when conditional) → Dense → [B, H/2^d,
  W/2^d, width·2^(d−1)] → SiLU → [ConvT 4×4 /2, SiLU] × d (widths halving to `width`) →
  Conv 3×3 (C·P) → (loc, log_scale | None) [B, H, W, C]; d = depth, P = 2 with a learned
  scale."""
  image_shape: tuple[int, int, int]
  num_classes: int = 0
  width: int = 32
  depth: int = 2
  learned_scale: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, labels):
    sh, sw = check_shape(self.image_shape, self.depth)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    C = self.image_shape[-1]
    h = z.astype(self.dtype)
    if self.num_classes:
      h = jnp.concatenate([h, nn.Embed(self.num_classes, self.width, name="embed_y",
                                       **kw)(labels)], axis=-1)
    top = self.width * 2 ** max(self.depth - 1, 0)
    h = nn.silu(nn.Dense(sh * sw * top, name="project", **kw)(h))
    h = h.reshape(z.shape[0], sh, sw, top)
    for i in reversed(range(self.depth)):
      h = nn.silu(nn.ConvTranspose(self.width * 2 ** max(i - 1, 0), (4, 4), strides=(2, 2),
                                   padding="SAME", name=f"up_{i}", **kw)(h))
    P = 2 if self.learned_scale else 1
    out = nn.Conv(C * P, (3, 3), padding="SAME", name="conv_out", **kw)(h)
    return _outputs(out, self.learned_scale)


def build(config, image_shape: tuple[int, int, int], num_classes: int):
  """config.vae → (encoder, decoder) for per-example images of `image_shape` (H, W, C).
  Conditional on num_classes only when config.model.class_conditional; the decoder
  outputs a log-scale when config.vae.likelihood has a learned scale."""
  from diffusion_jax.nets import dtype  # the package imports this module
  v = config.vae
  image_shape = tuple(int(s) for s in image_shape)
  num_classes = num_classes if config.model.class_conditional else 0
  kw = dict(num_classes=num_classes, width=v.width, depth=v.depth,
            dtype=dtype(config.model.dtype, "model.dtype"),
            param_dtype=dtype(config.model.param_dtype, "model.param_dtype"))
  learned = v.likelihood in LEARNED_SCALE
  if v.network == "mlp":
    return (MLPEncoder(latent_dim=v.latent_dim, **kw),
            MLPDecoder(image_shape=image_shape, learned_scale=learned, **kw))
  if v.network == "conv":
    check_shape(image_shape, v.depth)
    return (ConvEncoder(image_shape=image_shape, latent_dim=v.latent_dim, **kw),
            ConvDecoder(image_shape=image_shape, learned_scale=learned, **kw))
  raise ValueError(f"config.vae.network={v.network!r}: expected one of {list(NETWORKS)}")
