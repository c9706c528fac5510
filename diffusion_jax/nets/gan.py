"""GAN generators and discriminators (stateless flax.linen; config.gan).

Generators map a latent z ~ N(0, I) (and a class label) to an image in the data's range;
discriminators map an image (and a label) to logits:

    G(z [B, latent_dim], labels [B] int32, keys=None, train=False) -> x [B, H, W, C]
    D(x [B, H, W, C], labels [B] int32, train=False) -> logits [B]  (mlp, dcgan)
                                                         or [B, h, w] (patchgan)

Labels are ignored when `num_classes == 0` (unconditional). `keys` is a [B] typed PRNG
key array for per-example noise (only StyleGAN uses it; None: no noise, deterministic).
`train` selects BatchNorm's mode (batch statistics and `batch_stats` updates when True,
running averages when False).

Networks:
  mlp       the 2-D toy: MLP G with a linear output; MLP D (projection when conditional).
  dcgan     Radford et al. 2016: transposed-conv G (BatchNorm, ReLU, tanh), strided-conv D
            (LeakyReLU, no pooling); conditional G by conditional BatchNorm (de Vries et
            al. 2017, Dumoulin et al. 2017), conditional D by projection (Miyato & Koyama
            2018).
  stylegan  Karras et al. 2019: mapping network z → w, learned constant, AdaIN, per-pixel
            noise injection, nearest-neighbour upsampling, linear toRGB.
  patchgan  Isola et al. 2017 (pix2pix's NLayerDiscriminator): a fully convolutional D
            with one logit per (overlapping, 70×70 at patch_layers=3) input patch.

Every module computes in `dtype` with parameters in `param_dtype`; normalisation
statistics are float32 and outputs (images, logits) are float32.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

GENERATORS = ("mlp", "dcgan", "stylegan")
DISCRIMINATORS = ("mlp", "dcgan", "patchgan")
NORMS = ("batch", "layer", "none")


# ---------------------------------------------------------------------------------------
# Shapes


def upsampling_levels(image_shape, key: str, name: str) -> int:
  """The number n of stride-2 levels of a DCGAN / StyleGAN for image_shape (H, W, C): the
  largest n with H and W divisible by 2^n and H/2^n, W/2^n ≥ 3 (8×8 → 1, start 4;
  28×28 → 2, start 7; 32×32 → 3, start 4; 64×64 → 4). Raises ValueError naming the
  config key (`key`=`name`) and the shape when n = 0."""
  H, W = image_shape[0], image_shape[1]
  n = 0
  while H % 2 ** (n + 1) == 0 and W % 2 ** (n + 1) == 0 and min(
      H // 2 ** (n + 1), W // 2 ** (n + 1)) >= 3:
    n += 1
  if n == 0:
    raise ValueError(
        f"{key}={name!r} needs an image shape whose H and W are divisible by 2 at least "
        f"once with a start resolution >= 3 (H/2^n, W/2^n); got image shape "
        f"{tuple(image_shape)}")
  return n


def patch_shape(image_shape, patch_layers: int) -> tuple[int, int]:
  """PatchGAN output (h, w) for image_shape: patch_layers 4×4 stride-2 convolutions then
  two 4×4 stride-1 ones, all with padding 1: out = ⌊(in + 2 − 4)/s⌋ + 1. Raises
  ValueError (naming config.gan.discriminator, config.gan.patch_layers and the shape)
  when the map would be empty."""
  size = []
  for n in image_shape[:2]:
    for _ in range(patch_layers):
      n = (n + 2 - 4) // 2 + 1 if n >= 2 else 0
    for _ in range(2):
      n = n + 2 - 4 + 1
    size.append(n)
  if patch_layers < 1 or min(size) < 1:
    raise ValueError(
        f"config.gan.discriminator='patchgan' with config.gan.patch_layers={patch_layers} "
        f"gives an empty patch map for image shape {tuple(image_shape)}: use fewer "
        f"patch_layers (>= 1) or larger images")
  return tuple(size)


def _f32(x):
  return x.astype(jnp.float32)


# ---------------------------------------------------------------------------------------
# Normalisation


class ConditionalBatchNorm(nn.Module):
  """Conditional BatchNorm (de Vries et al. 2017; Dumoulin et al. 2017):
  a BatchNorm without its own affine, then a per-class scale and shift,

      x̂ = (x − μ) / sqrt(σ² + ε),   out = γ_y ⊙ x̂ + β_y,

  μ, σ² the per-channel statistics over all axes but the last (the batch's when
  train=True, the running averages otherwise), γ_y, β_y rows y of nn.Embed tables
  [num_classes, C] initialised to 1 and 0 (a fresh CBN is plain BatchNorm).

  x [B, ..., C], labels [B] int32 → [B, ..., C] (statistics in float32, output `dtype`).
  """
  num_classes: int
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    C = x.shape[-1]
    h = nn.BatchNorm(use_running_average=not train, momentum=self.momentum,
                     epsilon=self.epsilon, use_scale=False, use_bias=False,
                     dtype=jnp.float32, param_dtype=self.param_dtype, name="norm")(_f32(x))
    embed = lambda init, name: nn.Embed(self.num_classes, C, dtype=jnp.float32,
                                        param_dtype=self.param_dtype,
                                        embedding_init=init, name=name)(labels)
    gamma = embed(nn.initializers.ones, "scale")
    beta = embed(nn.initializers.zeros, "shift")
    bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (C,)
    return (h * gamma.reshape(bshape) + beta.reshape(bshape)).astype(self.dtype)


def _d_norm(kind: str, x, train: bool, param_dtype, name: str):
  """The discriminator's normalisation (config.gan.d_norm) of x [B, ..., C] in float32:
  'batch' BatchNorm (batch statistics when train), 'layer' LayerNorm over all axes but
  the batch (per-example; with a per-channel affine), 'none' the identity."""
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=jnp.float32, param_dtype=param_dtype, name=name)(_f32(x))
  if kind == "layer":
    axes = tuple(range(1, x.ndim))
    return nn.LayerNorm(epsilon=1e-5, reduction_axes=axes, feature_axes=-1,
                        dtype=jnp.float32, param_dtype=param_dtype, name=name)(_f32(x))
  if kind == "none":
    return x
  raise ValueError(f"config.gan.d_norm={kind!r}: expected one of {list(NORMS)}")


def _project(module: nn.Module, phi, labels):
  """The discriminator head with the projection discriminator (Miyato & Koyama 2018):

      logit = Dense(1)(φ) + ⟨Embed(y), φ⟩     (the second term only when conditional)

  φ [B, F] the features (sown as intermediates 'features'), labels [B] → [B] float32.
  Creates the submodules 'logit' and 'embed_y' in `module`'s scope."""
  module.sow("intermediates", "features", phi)
  logit = nn.Dense(1, dtype=module.dtype, param_dtype=module.param_dtype,
                   name="logit")(phi)[:, 0]
  logit = _f32(logit)
  if module.num_classes:
    e = nn.Embed(module.num_classes, phi.shape[-1], dtype=module.dtype,
                 param_dtype=module.param_dtype, name="embed_y")(labels)
    logit = logit + jnp.sum(_f32(e) * _f32(phi), axis=-1)
  return logit


# ---------------------------------------------------------------------------------------
# MLP (the 2-D toy)


class MLPGenerator(nn.Module):
  """z [B, latent_dim] (‖ one_hot(y) when conditional) → [Dense(width), ReLU] × depth →
  Dense(H·W·C) → x [B, H, W, C], a *linear* output (toy data is not in [−1, 1])."""
  image_shape: tuple[int, int, int]
  num_classes: int = 0
  width: int = 256
  depth: int = 3
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, labels, keys=None, train: bool = False):
    del keys, train
    h = z.astype(self.dtype)
    if self.num_classes:
      h = jnp.concatenate([h, jax.nn.one_hot(labels, self.num_classes, dtype=self.dtype)],
                          axis=-1)
    for i in range(self.depth):
      h = nn.relu(nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                           name=f"hidden_{i}")(h))
    out = nn.Dense(math.prod(self.image_shape), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="out")(h)
    return _f32(out).reshape((z.shape[0],) + tuple(self.image_shape))


class MLPDiscriminator(nn.Module):
  """x [B, H, W, C] → flatten → [Dense(width), norm, LeakyReLU(0.2)] × depth → φ →
  logit [B] = Dense(1)(φ) (+ ⟨Embed(y), φ⟩ when conditional: `_project`)."""
  num_classes: int = 0
  width: int = 256
  depth: int = 3
  norm: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    h = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i in range(self.depth):
      h = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                   name=f"hidden_{i}")(h)
      h = _d_norm(self.norm, h, train, self.param_dtype, f"norm_{i}")
      h = nn.leaky_relu(h, 0.2).astype(self.dtype)
    return _project(self, h, labels)


# ---------------------------------------------------------------------------------------
# DCGAN


class DCGANGenerator(nn.Module):
  """DCGAN generator (Radford et al. 2016's rules: fractionally-strided
  convolutions, BatchNorm, ReLU, tanh output):

      z → Dense(s_h·s_w·c·2^(n−1)) → [B, s_h, s_w, c·2^(n−1)] → BN → ReLU
        → (ConvT 4×4 /2 → BN → ReLU) × (n−1), halving the width to c
        → ConvT 4×4 /2 → C → tanh                       x [B, H, W, C] in [−1, 1]

  n = upsampling_levels(image_shape), (s_h, s_w) = (H, W)/2^n, c = `channels`. When
  num_classes > 0 the label enters twice: a class embedding added to the projection
  (= one_hot(y) concatenated to z) and ConditionalBatchNorm (per-class γ_y, β_y)."""
  image_shape: tuple[int, int, int]
  num_classes: int = 0
  channels: int = 64
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, labels, keys=None, train: bool = False):
    del keys
    H, W, C = self.image_shape
    n = upsampling_levels(self.image_shape, "config.gan.generator", "dcgan")
    sh, sw = H // 2 ** n, W // 2 ** n
    width = self.channels * 2 ** (n - 1)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def bn_relu(h, i):
      if self.num_classes:
        h = ConditionalBatchNorm(self.num_classes, name=f"norm_{i}", **kw)(h, labels, train)
      else:
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=jnp.float32, param_dtype=self.param_dtype,
                         name=f"norm_{i}")(_f32(h))
      return nn.relu(h).astype(self.dtype)

    h = nn.Dense(sh * sw * width, use_bias=False, name="project", **kw)(z.astype(self.dtype))
    if self.num_classes:
      # = Dense([z, one_hot(y)]) (Mirza & Osindero's conditional input). Conditional
      # BatchNorm alone was not enough here: a 28×28 DCGAN has only two normalisations,
      # and its samples ignored the label (domain accuracy 0.13 vs 0.67 with this term,
      # mnist5k, 1,500 steps).
      h = h + nn.Embed(self.num_classes, sh * sw * width, name="embed_y", **kw)(labels)
    h = bn_relu(h.reshape(z.shape[0], sh, sw, width), 0)
    for i in range(1, n):
      width //= 2
      h = nn.ConvTranspose(width, (4, 4), strides=(2, 2), padding="SAME", use_bias=False,
                           name=f"up_{i}", **kw)(h)
      h = bn_relu(h, i)
    out = nn.ConvTranspose(C, (4, 4), strides=(2, 2), padding="SAME", name="out", **kw)(h)
    return jnp.tanh(_f32(out))


class DCGANDiscriminator(nn.Module):
  """DCGAN discriminator (Radford et al. 2016): strided convolutions, no pooling,

      x → (Conv 4×4 /2 → [norm] → LeakyReLU(0.2)) × n, widths c, 2c, …, 2^(n−1)c
        (no norm on the first) → flatten φ [B, s_h·s_w·2^(n−1)c] → logit [B]

  logit = Dense(1)(φ) + ⟨Embed(y), φ⟩ when conditional (projection; `_project`).
  n = upsampling_levels(image_shape) as the generator's."""
  image_shape: tuple[int, int, int]
  num_classes: int = 0
  channels: int = 64
  norm: str = "batch"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    n = upsampling_levels(self.image_shape, "config.gan.discriminator", "dcgan")
    h = x.astype(self.dtype)
    for i in range(n):
      h = nn.Conv(self.channels * 2 ** i, (4, 4), strides=(2, 2), padding="SAME",
                  use_bias=i == 0 or self.norm != "batch", dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"conv_{i}")(h)
      if i:
        h = _d_norm(self.norm, h, train, self.param_dtype, f"norm_{i}")
      h = nn.leaky_relu(h, 0.2).astype(self.dtype)
    return _project(self, h.reshape(h.shape[0], -1), labels)


# ---------------------------------------------------------------------------------------
# StyleGAN


def pixel_norm(z, eps: float = 1e-8):
  """z / sqrt(mean(z², axis=−1) + ε) (Karras et al. 2018), z [..., D] in float32."""
  z = _f32(z)
  return z * jax.lax.rsqrt(jnp.mean(z * z, axis=-1, keepdims=True) + eps)


class AdaIN(nn.Module):
  """Adaptive instance normalisation (Huang & Belongie 2017; StyleGAN, Karras et al. 2019):

      AdaIN(x, w) = y_s(w) ⊙ (x − μ(x)) / σ(x) + y_b(w),
      y_s = 1 + Dense(w),  y_b = Dense(w)     (both Dense initialised to zero),

  μ, σ² the per-example, per-channel mean and variance over H, W; σ = sqrt(σ² + 1e-5).
  A fresh AdaIN is plain instance norm; the style w sets each channel's mean (y_b) and
  standard deviation (|y_s|). x [B, H, W, C], w [B, style_dim] → [B, H, W, C] (`dtype`;
  the statistics in float32)."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, w):
    C = x.shape[-1]
    dense = lambda name: _f32(nn.Dense(C, kernel_init=nn.initializers.zeros,
                                       dtype=self.dtype, param_dtype=self.param_dtype,
                                       name=name)(w.astype(self.dtype)))
    ys = 1.0 + dense("scale")
    yb = dense("shift")
    x = _f32(x)
    mu = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=(1, 2), keepdims=True)
    xhat = (x - mu) * jax.lax.rsqrt(var + self.epsilon)
    return (ys[:, None, None, :] * xhat + yb[:, None, None, :]).astype(self.dtype)


class NoiseInjection(nn.Module):
  """StyleGAN's per-pixel noise: x + s ⊙ n with n [B, H, W, 1] ~ N(0, 1), one map per
  example drawn from fold_in(keys[i], layer_index), s [C] per-channel scales
  initialised to 0. keys None: x unchanged (deterministic). x [B, H, W, C], keys [B]."""
  layer_index: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, keys):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    if keys is None:
      return x
    H, W = x.shape[1], x.shape[2]
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, self.layer_index),
                                                 (H, W, 1)))(keys)
    return (_f32(x) + _f32(scale) * noise).astype(self.dtype)


def _mapping(module: StyleGANGenerator, z, labels):
  """StyleGAN's mapping network in `module`'s scope: z [B, D], labels [B] →
  w [B, style_dim] (compute dtype)."""
  kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
  h = pixel_norm(z)
  if module.num_classes:
    e = nn.Embed(module.num_classes, z.shape[-1], name="embed_y", **kw)(labels)
    h = jnp.concatenate([h, pixel_norm(e)], axis=-1)
  h = h.astype(module.dtype)
  for i in range(module.mapping_depth):
    h = nn.leaky_relu(nn.Dense(module.style_dim, name=f"mapping_{i}", **kw)(h), 0.2)
  return h


class StyleGANGenerator(nn.Module):
  """A StyleGAN generator (Karras et al. 2019), without progressive growing, equalised
  learning rates or style mixing.

  Mapping: w = (Dense(style_dim) → LeakyReLU(0.2)) × mapping_depth applied to
  pixel_norm(z) (‖ pixel_norm(Embed(y)) when conditional, as StyleGAN2-ADA).

  Synthesis: a learned constant [s_h, s_w, c·2^(n−1)] (N(0, 1) as StyleGAN2's: a
  spatially uniform one would be erased by the first instance norm while AdaIN's style
  Dense layers are still zero), then n+1 resolutions
  (the start, then n nearest-neighbour 2× upsamplings; widths c·2^max(n−1−k, 0) at level
  k), each two blocks

      [Conv 3×3] → NoiseInjection → LeakyReLU(0.2) → AdaIN(·, w)

  (at the start resolution the first block has no conv: const → noise → act → AdaIN),
  then toRGB: a linear 1×1 conv to C (no tanh). n, (s_h, s_w) as DCGAN's.

  z [B, latent_dim], labels [B], keys [B] or None → x [B, H, W, C] float32. `train` is
  accepted and ignored (no BatchNorm)."""
  image_shape: tuple[int, int, int]
  num_classes: int = 0
  channels: int = 64
  style_dim: int = 128
  mapping_depth: int = 4
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z, labels, keys=None, train: bool = False):
    del train
    H, W, C = self.image_shape
    n = upsampling_levels(self.image_shape, "config.gan.generator", "stylegan")
    sh, sw = H // 2 ** n, W // 2 ** n
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    w = _mapping(self, z, labels)
    B = z.shape[0]
    width = self.channels * 2 ** (n - 1)
    const = self.param("const", nn.initializers.normal(1.0), (sh, sw, width), self.param_dtype)
    h = jnp.broadcast_to(const.astype(self.dtype), (B, sh, sw, width))
    layer = 0
    for k in range(n + 1):
      width = self.channels * 2 ** max(n - 1 - k, 0)
      if k:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      for j in range(2):
        if k or j:
          h = nn.Conv(width, (3, 3), padding="SAME", name=f"conv_{layer}", **kw)(h)
        h = NoiseInjection(layer, name=f"noise_{layer}", **kw)(h, keys)
        h = nn.leaky_relu(h, 0.2)
        h = AdaIN(name=f"adain_{layer}", **kw)(h, w)
        layer += 1
    out = nn.Conv(C, (1, 1), name="to_rgb", **kw)(h)
    return _f32(out)


# ---------------------------------------------------------------------------------------
# PatchGAN


class PatchGANDiscriminator(nn.Module):
  """pix2pix's NLayerDiscriminator (Isola et al. 2017): one logit per input patch,

      Conv 4×4 /2 (c) → LeakyReLU(0.2)
      (Conv 4×4 /2 (c·min(2^i, 8)) → norm → LeakyReLU) for i = 1 … L−1
      Conv 4×4 /1 (c·min(2^L, 8)) → norm → LeakyReLU
      Conv 4×4 /1 (1)

  every conv padded by 1, L = patch_layers. Receptive field of each logit:
  r = 1 + Σ_l 3·Π_{m<l} s_m = 70 pixels for L = 3 (34 for L = 2, 142 for L = 4).
  x [B, H, W, C] → logits [B, h, w] float32 (`patch_shape`). Unconditional only
  (labels accepted and ignored)."""
  channels: int = 64
  patch_layers: int = 3
  norm: str = "batch"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, labels=None, train: bool = False):
    del labels
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, padding=((1, 1), (1, 1)))
    L = self.patch_layers
    h = nn.Conv(self.channels, (4, 4), strides=(2, 2), name="conv_0", **kw)(
        x.astype(self.dtype))
    h = nn.leaky_relu(h, 0.2)
    for i in range(1, L + 1):
      h = nn.Conv(self.channels * min(2 ** i, 8), (4, 4), strides=(2, 2) if i < L else (1, 1),
                  use_bias=self.norm != "batch", name=f"conv_{i}", **kw)(h)
      h = _d_norm(self.norm, h, train, self.param_dtype, f"norm_{i}")
      h = nn.leaky_relu(h, 0.2).astype(self.dtype)
    out = nn.Conv(1, (4, 4), name="out", **kw)(h)
    return _f32(out[..., 0])


# ---------------------------------------------------------------------------------------
# Builders


def _dtypes(config) -> dict:
  from diffusion_jax.nets import dtype
  return dict(dtype=dtype(config.model.dtype, "model.dtype"),
              param_dtype=dtype(config.model.param_dtype, "model.param_dtype"))


def build_generator(config, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
  """config.gan.generator → G(z, labels, keys=None, train=False) -> x [B, H, W, C].
  Conditional on num_classes only when config.model.class_conditional."""
  g = config.gan
  image_shape = tuple(int(s) for s in image_shape)
  num_classes = num_classes if config.model.class_conditional else 0
  kw = dict(image_shape=image_shape, num_classes=num_classes, **_dtypes(config))
  if g.generator == "mlp":
    return MLPGenerator(width=g.mlp_width, depth=g.mlp_depth, **kw)
  if g.generator == "dcgan":
    upsampling_levels(image_shape, "config.gan.generator", "dcgan")
    return DCGANGenerator(channels=g.channels, **kw)
  if g.generator == "stylegan":
    upsampling_levels(image_shape, "config.gan.generator", "stylegan")
    return StyleGANGenerator(channels=g.channels, style_dim=g.style_dim,
                             mapping_depth=g.mapping_depth, **kw)
  raise ValueError(f"config.gan.generator={g.generator!r}: expected one of "
                   f"{list(GENERATORS)}")


def build_discriminator(config, image_shape: tuple[int, int, int],
                        num_classes: int) -> nn.Module:
  """config.gan.discriminator → D(x, labels, train=False) -> logits [B] (mlp, dcgan) or
  [B, h, w] (patchgan). Conditional (projection) on num_classes only when
  config.model.class_conditional; patchgan cannot be conditional."""
  g = config.gan
  image_shape = tuple(int(s) for s in image_shape)
  num_classes = num_classes if config.model.class_conditional else 0
  if g.d_norm not in NORMS:
    raise ValueError(f"config.gan.d_norm={g.d_norm!r}: expected one of {list(NORMS)}")
  kw = dict(norm=g.d_norm, **_dtypes(config))
  if g.discriminator == "mlp":
    return MLPDiscriminator(num_classes=num_classes, width=g.mlp_width, depth=g.mlp_depth,
                            **kw)
  if g.discriminator == "dcgan":
    upsampling_levels(image_shape, "config.gan.discriminator", "dcgan")
    return DCGANDiscriminator(image_shape=image_shape, num_classes=num_classes,
                              channels=g.channels, **kw)
  if g.discriminator == "patchgan":
    if num_classes:
      raise ValueError(
          "config.gan.discriminator='patchgan' cannot be class-conditional (image shape "
          f"{image_shape}, {num_classes} classes): set config.model.class_conditional="
          "False or use config.gan.discriminator='dcgan' / 'mlp'")
    patch_shape(image_shape, g.patch_layers)
    return PatchGANDiscriminator(channels=g.channels, patch_layers=g.patch_layers, **kw)
  raise ValueError(f"config.gan.discriminator={g.discriminator!r}: expected one of "
                   f"{list(DISCRIMINATORS)}")
