"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", §3.1), with diffusers' `AutoencoderKL`
architecture, and the loading of the published Stable Diffusion 1.x/2.x, SDXL and FLUX.1
autoencoders.

    encode: x [B, H, W, C_in] in [-1, 1] → (μ, log σ²) [B, H/f, W/f, latent_channels]
    decode: z [B, H/f, W/f, latent_channels] → x̂ [B, H, W, C_out]

f = H/h = 2^m (Rombach et al. 2022, §3.1) with m = len(block_out_channels) − 1. The
posterior is the diagonal Gaussian q(z|x) = N(μ, σ²) whose sample is z = μ + σ·ε,
ε ~ N(0, I) (the reparameterisation, Kingma & Welling 2014, §2.4); log σ² is clipped to
[−30, 20] as diffusers' DiagonalGaussianDistribution (and latent-diffusion's) clip it.

The network is the convolutional encoder/decoder of VQGAN (Esser et al. 2021, "Taming
Transformers", §3.1) without the quantiser:

  encoder: conv_in 3×3 → len(block_out_channels) down blocks (`layers_per_block` ResNet
    blocks each, He et al. 2016; a stride-2 3×3 convolution after every block but the
    last, on the input padded by one row/column at the bottom/right) → mid block (ResNet,
    single-head self-attention, ResNet) → GroupNorm → SiLU → conv_out 3×3 to
    2·latent_channels [μ, log σ²] → quant_conv 1×1 (optional);
  decoder: post_quant_conv 1×1 (optional) → conv_in 3×3 → mid block → the up blocks in
    reverse channel order (`layers_per_block + 1` ResNet blocks each; nearest ×2 + 3×3
    convolution after every block but the last) → GroupNorm → SiLU → conv_out 3×3.

A ResNet block is h = conv2(SiLU(GN(conv1(SiLU(GN(x)))))), out = shortcut(x) + h with a
1×1 convolution as shortcut when the channel count changes. The attention is
softmax(q kᵀ/√C) v over the h·w positions of GN(x), with q, k, v and the output linear
maps of width C (Vaswani et al. 2017), added to x. GroupNorm (Wu & He 2018) has
`norm_groups` groups and ε = 1e-6; its statistics, its parameters and the attention
softmax are float32 whatever `dtype` is (bf16 compute rounds the convolutions, not the
normalisation statistics).
Outputs are float32; decode does not clip x̂.

Parameters mirror diffusers' names (`params["decoder"]["up_blocks_0"]["resnets_1"]
["conv1"]["kernel"]` is diffusers' `decoder.up_blocks.0.resnets.1.conv1.weight`).
`params_from_state_dict` converts a diffusers or a latent-diffusion / CompVis / BFL state
dict (it detects which); `load_pretrained` reads a file the user has (nothing is
downloaded):

    module, variables, scale, shift = autoencoder.load_pretrained(
        "diffusion_pytorch_model.safetensors", "sd")
    mean, logvar = module.apply(variables, x, method=module.encode)
    z = scale * (mean - shift)          # the diffusion model's latent
    x_hat = module.apply(variables, z / scale + shift, method=module.decode)

PRESETS holds the published architectures and latent normalisations z_scaled =
scale·(z − shift) (Rombach et al. 2022, §4.3.2), read from the diffusers `vae/config.json`
of each release (see PRESETS). docs/autoencoders.md has the table and the key names.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.nets import torch_weights

if TYPE_CHECKING:
  from ml_collections import ConfigDict

__all__ = ["AutoencoderKL", "LAST_LAYER", "LOGVAR_RANGE", "PRESETS", "from_config",
           "from_preset", "load_pretrained", "params_from_state_dict", "state_dict_shapes"]

# The path, inside the "params" tree, of the decoder's last layer weight (latent
# diffusion's adaptive GAN weight is computed from the gradients there).
LAST_LAYER = ("decoder", "conv_out", "kernel")
LOGVAR_RANGE = (-30.0, 20.0)
EPS = 1e-6

_SD_ARCH = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_groups=32, mid_attention=True)

# The published autoencoders: the module's fields plus the latent normalisation
# z_scaled = scale·(z − shift). Every value is from the diffusers `vae/config.json` of the
# release (block_out_channels, layers_per_block, latent_channels, norm_num_groups,
# mid_block_add_attention (absent = true), use_quant_conv / use_post_quant_conv (absent =
# true), scaling_factor, shift_factor (absent / null = 0)):
#   sd:   sd-legacy/stable-diffusion-v1-5 (runwayml/stable-diffusion-v1-5) and
#         stabilityai/stable-diffusion-2-1(-base), identical: 4 latent channels, 0.18215;
#   sdxl: stabilityai/stable-diffusion-xl-base-1.0: the same architecture, 0.13025;
#   flux: black-forest-labs/FLUX.1-dev and FLUX.1-schnell: 16 latent channels, no
#         quant_conv / post_quant_conv, scaling 0.3611, shift 0.1159 (also the BFL flux
#         repository's ae_params scale_factor / shift_factor).
PRESETS: dict[str, dict] = {
    "sd": dict(_SD_ARCH, latent_channels=4, use_quant_conv=True, use_post_quant_conv=True,
               scale=0.18215, shift=0.0),
    "sdxl": dict(_SD_ARCH, latent_channels=4, use_quant_conv=True, use_post_quant_conv=True,
                 scale=0.13025, shift=0.0),
    "flux": dict(_SD_ARCH, latent_channels=16, use_quant_conv=False,
                 use_post_quant_conv=False, scale=0.3611, shift=0.1159),
}


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
  """GroupNorm(groups, ε = 1e-6) computed and parameterised in float32 (two-pass
  variance: the decoder's activations reach magnitudes where E[x²] − E[x]² cancels)."""
  return nn.GroupNorm(num_groups=groups, epsilon=EPS, dtype=jnp.float32,
                      param_dtype=jnp.float32, use_fast_variance=False, name=name)


class _Layer(nn.Module):
  """Base of the blocks: `self.conv(features, kernel, name, stride, padding)`."""
  norm_groups: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def conv(self, features: int, kernel: int, name: str, stride: int = 1, padding=None):
    if padding is None:
      padding = ((kernel // 2,) * 2,) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def sublayer(self, cls, name: str, **kw):
    return cls(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype,
               name=name, **kw)


class ResnetBlock(_Layer):
  """x [B, H, W, Cin] → [B, H, W, out_channels]: h = conv2(SiLU(GN₂(conv1(SiLU(GN₁(x)))))),
  out = shortcut(x) + h, shortcut a 1×1 convolution when Cin ≠ out_channels (diffusers'
  ResnetBlock2D without a time embedding; latent-diffusion's ResnetBlock)."""
  out_channels: int = 0

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.norm_groups, "norm1")(x)).astype(self.dtype)
    h = self.conv(self.out_channels, 3, "conv1")(h)
    h = nn.silu(_group_norm(self.norm_groups, "norm2")(h)).astype(self.dtype)
    h = self.conv(self.out_channels, 3, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = self.conv(self.out_channels, 1, "conv_shortcut")(x)
    return x.astype(self.dtype) + h


class AttentionBlock(_Layer):
  """x [B, H, W, C] → x + W_o·softmax(q kᵀ/√C) v, q, k, v = W_{q,k,v}·GN(x) over the H·W
  positions, one head of width C (Vaswani et al. 2017, eq. 1). Softmax in float32 inside
  `jax.nn.dot_product_attention`."""

  @nn.compact
  def __call__(self, x):
    B, H, W, C = x.shape
    h = _group_norm(self.norm_groups, "group_norm")(x).astype(self.dtype)
    h = h.reshape(B, H * W, 1, C)   # [B, T, heads = 1, C]
    dense = lambda name: nn.Dense(C, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=name)
    out = jax.nn.dot_product_attention(dense("to_q")(h), dense("to_k")(h), dense("to_v")(h))
    out = dense("to_out")(out.reshape(B, H * W, C))
    return x.astype(self.dtype) + out.reshape(B, H, W, C).astype(self.dtype)


class MidBlock(_Layer):
  """ResNet → self-attention (when `attention`) → ResNet at constant width."""
  attention: bool = True

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    x = self.sublayer(ResnetBlock, "resnets_0", out_channels=C)(x)
    if self.attention:
      x = self.sublayer(AttentionBlock, "attention")(x)
    return self.sublayer(ResnetBlock, "resnets_1", out_channels=C)(x)


class DownBlock(_Layer):
  """`num_layers` ResNet blocks to `out_channels`, then (`downsample`) zero padding of one
  row and column at the bottom/right and a stride-2 3×3 convolution: [B, H, W, ·] →
  [B, ⌊H/2⌋, ⌊W/2⌋, out_channels] (diffusers' DownEncoderBlock2D)."""
  out_channels: int = 0
  num_layers: int = 1
  downsample: bool = True

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = self.sublayer(ResnetBlock, f"resnets_{j}", out_channels=self.out_channels)(x)
    if self.downsample:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      x = self.conv(self.out_channels, 3, "downsample", stride=2, padding="VALID")(x)
    return x


class UpBlock(_Layer):
  """`num_layers` ResNet blocks to `out_channels`, then (`upsample`) nearest-neighbour ×2
  and a 3×3 convolution: [B, H, W, ·] → [B, 2H, 2W, out_channels] (diffusers'
  UpDecoderBlock2D)."""
  out_channels: int = 0
  num_layers: int = 1
  upsample: bool = True

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = self.sublayer(ResnetBlock, f"resnets_{j}", out_channels=self.out_channels)(x)
    if self.upsample:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = self.conv(self.out_channels, 3, "upsample")(x)
    return x


class Encoder(_Layer):
  """x [B, H, W, C] → moments [B, H/f, W/f, out_channels] (compute dtype): the module
  docstring's encoder up to conv_out."""
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  out_channels: int = 8
  mid_attention: bool = True

  @nn.compact
  def __call__(self, x):
    chans = self.block_out_channels
    x = self.conv(chans[0], 3, "conv_in")(x.astype(self.dtype))
    for i, c in enumerate(chans):
      x = self.sublayer(DownBlock, f"down_blocks_{i}", out_channels=c,
                        num_layers=self.layers_per_block, downsample=i < len(chans) - 1)(x)
    x = self.sublayer(MidBlock, "mid_block", attention=self.mid_attention)(x)
    x = nn.silu(_group_norm(self.norm_groups, "norm_out")(x)).astype(self.dtype)
    return self.conv(self.out_channels, 3, "conv_out")(x)


class Decoder(_Layer):
  """z [B, h, w, C] → x̂ [B, f·h, f·w, out_channels] (compute dtype): the module
  docstring's decoder after post_quant_conv."""
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  out_channels: int = 3
  mid_attention: bool = True

  @nn.compact
  def __call__(self, z):
    chans = tuple(reversed(self.block_out_channels))
    x = self.conv(chans[0], 3, "conv_in")(z.astype(self.dtype))
    x = self.sublayer(MidBlock, "mid_block", attention=self.mid_attention)(x)
    for i, c in enumerate(chans):
      x = self.sublayer(UpBlock, f"up_blocks_{i}", out_channels=c,
                        num_layers=self.layers_per_block + 1, upsample=i < len(chans) - 1)(x)
    x = nn.silu(_group_norm(self.norm_groups, "norm_out")(x)).astype(self.dtype)
    return self.conv(self.out_channels, 3, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder (module docstring), NHWC, diffusers' `AutoencoderKL` layout.

  encode(x [B, H, W, in_channels]) -> (mean, logvar), each [B, H/f, W/f, latent_channels]
    float32, f = 2^(len(block_out_channels) − 1), logvar clipped to [−30, 20]; H and W
    must be multiples of f;
  decode(z [B, h, w, latent_channels]) -> x̂ [B, f·h, f·w, out_channels] float32, not
    clipped;
  __call__(x) -> (decode(mean), mean, logvar) (initialises every parameter).

  Use with `apply(variables, x, method=module.encode)` (or `decode`). `dtype` is the
  compute dtype; GroupNorm runs and keeps its parameters in float32 whatever `dtype` and
  `param_dtype` are.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_groups: int = 32
  mid_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def downsample_factor(self) -> int:
    """f = H/h = 2^(len(block_out_channels) − 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def setup(self):
    chans = tuple(self.block_out_channels)
    if not chans:
      raise ValueError("autoencoder.channels (block_out_channels) is empty: expected at "
                       "least one level, e.g. (128, 256, 512, 512)")
    bad = [c for c in chans if c % self.norm_groups]
    if bad:
      raise ValueError(f"autoencoder.norm_groups={self.norm_groups} does not divide the "
                       f"channels {bad} of autoencoder.channels={chans}")
    kw = dict(block_out_channels=chans, layers_per_block=self.layers_per_block,
              norm_groups=self.norm_groups, mid_attention=self.mid_attention,
              dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(out_channels=2 * self.latent_channels, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)
    conv = lambda c: nn.Conv(c, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype)
    if self.use_quant_conv:
      self.quant_conv = conv(2 * self.latent_channels)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv(self.latent_channels)

  def encode(self, x):
    f = self.downsample_factor
    if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"AutoencoderKL.encode: expected images [B, H, W, {self.in_channels}] "
                       f"with H and W multiples of f={f}, got shape {x.shape}")
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"AutoencoderKL.decode: expected latents [B, h, w, "
                       f"{self.latent_channels}], got shape {z.shape}")
    z = z.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x):
    mean, logvar = self.encode(x)
    return self.decode(mean), mean, logvar


def _module_fields(spec: Mapping) -> dict:
  return {k: v for k, v in spec.items() if k not in ("scale", "shift")}


def from_config(ae_cfg: ConfigDict, channels: int, dtype=jnp.float32,
                param_dtype=jnp.float32) -> AutoencoderKL:
  """config.autoencoder (channels = block_out_channels, layers_per_block,
  latent_channels, norm_groups, mid_attention) → AutoencoderKL for images of `channels`
  channels (in = out). dtypes are jnp dtypes or their names."""
  return AutoencoderKL(in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(ae_cfg.channels),
                       layers_per_block=ae_cfg.layers_per_block,
                       latent_channels=ae_cfg.latent_channels, norm_groups=ae_cfg.norm_groups,
                       mid_attention=ae_cfg.mid_attention, dtype=jnp.dtype(dtype),
                       param_dtype=jnp.dtype(param_dtype))


def _preset(preset: str) -> dict:
  if preset not in PRESETS:
    raise ValueError(f"autoencoder preset {preset!r}: expected one of {sorted(PRESETS)}")
  return PRESETS[preset]


def from_preset(preset: str, dtype=jnp.float32, param_dtype=jnp.float32) -> AutoencoderKL:
  """The published architecture PRESETS[preset] (no weights); its latent normalisation
  is PRESETS[preset]["scale"] / ["shift"]."""
  return AutoencoderKL(**_module_fields(_preset(preset)), dtype=jnp.dtype(dtype),
                       param_dtype=jnp.dtype(param_dtype))


# ---------------------------------------------------------------------------------------
# Weight conversion. A flax path (module names, then kernel / bias / scale) maps to one
# torch key per naming scheme:
#   "diffusers":     encoder.down_blocks.0.resnets.0.norm1.weight,
#                    mid_block.attentions.0.to_q.weight [C, C] (Linear), ...
#   "diffusers_old": the same with the attention's query / key / value / proj_attn
#                    (diffusers < 0.15's AttentionBlock names);
#   "ldm":           latent-diffusion / CompVis / Stability / BFL: encoder.down.0.block.0,
#                    nin_shortcut, mid.block_1, mid.attn_1.q [C, C, 1, 1] (1×1 conv),
#                    norm_out, decoder.up.N with N counted from the lowest resolution
#                    (diffusers' up_blocks.i is up.(levels − 1 − i)).
_ATTN = {"diffusers": {"group_norm": "group_norm", "to_q": "to_q", "to_k": "to_k",
                       "to_v": "to_v", "to_out": "to_out.0"},
         "diffusers_old": {"group_norm": "group_norm", "to_q": "query", "to_k": "key",
                           "to_v": "value", "to_out": "proj_attn"},
         "ldm": {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                 "to_out": "proj_out"}}
_FULL_MODEL_PREFIX = "first_stage_model."   # a full SD / SDXL checkpoint's autoencoder
# LDM training checkpoints also hold the training loss's LPIPS / discriminator weights
# and an EMA copy; neither is part of the network.
_LDM_IGNORED_PREFIXES = ("loss.", "model_ema.")


def _index(part: str) -> int:
  return int(part.rsplit("_", 1)[1])


def _torch_key(path: tuple[str, ...], naming: str, levels: int) -> str:
  """flax param path → the state-dict key of `naming` (see the table above)."""
  *mods, leaf = path
  ldm = naming == "ldm"
  out = []
  for i, m in enumerate(mods):
    parent = mods[i - 1] if i else ""
    if m.startswith("down_blocks_"):
      out.append(f"down.{_index(m)}" if ldm else f"down_blocks.{_index(m)}")
    elif m.startswith("up_blocks_"):
      out.append(f"up.{levels - 1 - _index(m)}" if ldm else f"up_blocks.{_index(m)}")
    elif m.startswith("resnets_"):
      j = _index(m)
      if ldm:
        out.append(f"block_{j + 1}" if parent == "mid_block" else f"block.{j}")
      else:
        out.append(f"resnets.{j}")
    elif m == "mid_block":
      out.append("mid" if ldm else "mid_block")
    elif m == "attention":
      out.append("attn_1" if ldm else "attentions.0")
    elif parent == "attention":
      out.append(_ATTN[naming][m])
    elif m == "downsample":
      out.append("downsample.conv" if ldm else "downsamplers.0.conv")
    elif m == "upsample":
      out.append("upsample.conv" if ldm else "upsamplers.0.conv")
    elif m == "norm_out":
      out.append("norm_out" if ldm else "conv_norm_out")
    elif m == "conv_shortcut":
      out.append("nin_shortcut" if ldm else "conv_shortcut")
    else:
      out.append(m)
  return ".".join(out + ["bias" if leaf == "bias" else "weight"])


def _torch_shape(path: tuple[str, ...], shape: tuple, naming: str) -> tuple:
  """A flax parameter's shape in torch layout: conv kernel [kh, kw, in, out] → [out, in,
  kh, kw]; attention Dense kernel [in, out] → [out, in] (diffusers' Linear) or
  [out, in, 1, 1] (latent-diffusion's 1×1 conv); vectors unchanged."""
  if path[-1] != "kernel":
    return tuple(shape)
  if len(shape) == 4:
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  cin, cout = shape
  return (cout, cin, 1, 1) if naming == "ldm" else (cout, cin)


def _to_flax(path: tuple[str, ...], w: np.ndarray, shape: tuple) -> np.ndarray:
  if path[-1] != "kernel":
    return w
  if len(shape) == 4:
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
  return np.ascontiguousarray(w.reshape(shape[::-1]).T)


def _naming(keys) -> str:
  if any(k.startswith(("encoder.down.", "encoder.mid.", "decoder.up.", "decoder.mid."))
         for k in keys):
    return "ldm"
  if any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.", "decoder.up_blocks.",
                       "decoder.mid_block.")) for k in keys):
    old = any(k.endswith((".attentions.0.query.weight", ".attentions.0.proj_attn.weight"))
              for k in keys)
    return "diffusers_old" if old else "diffusers"
  shown = ", ".join(sorted(keys)[:5]) or "(none)"
  raise ValueError("not an AutoencoderKL state dict: its keys follow neither diffusers' "
                   "names (encoder.down_blocks.0.resnets.0.norm1.weight, ...) nor "
                   "latent-diffusion's (encoder.down.0.block.0.norm1.weight, ...); "
                   f"first keys: {shown}")


@functools.lru_cache(maxsize=16)
def _table(module: AutoencoderKL, naming: str, image_size: int = 64) -> dict:
  """torch key → (flax path, flax shape) for every parameter of `module` (cached per
  architecture: tracing the full-size init takes about a second; do not mutate)."""
  if naming not in _ATTN:
    raise ValueError(f"naming={naming!r}: expected one of {sorted(_ATTN)}")
  f = module.downsample_factor
  size = max(f, image_size - image_size % f)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, module.in_channels),
                                               jnp.float32))["params"]
  levels = len(module.block_out_channels)
  table = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    path = tuple(k.key for k in kp)
    table[_torch_key(path, naming, levels)] = (path, tuple(leaf.shape))
  return table


def state_dict_shapes(module: AutoencoderKL, naming: str = "diffusers") -> dict[str, tuple]:
  """The state dict `module` expects: {key: torch-layout shape} in `naming`
  ("diffusers", "diffusers_old" or "ldm"; see the table above)."""
  return {k: _torch_shape(p, s, naming) for k, (p, s) in _table(module, naming).items()}


def params_from_state_dict(state_dict: Mapping, module: AutoencoderKL,
                           image_size: int = 64) -> dict:
  """A PyTorch AutoencoderKL state dict → {"params": ...} of `module` (numpy float32).

  Accepts diffusers' key names (also the pre-0.15 attention names query / key / value /
  proj_attn) and latent-diffusion's / CompVis' / Stability's / BFL's (encoder.down.0.block.0,
  nin_shortcut, mid.attn_1.q as a [C, C, 1, 1] 1×1 conv, decoder.up.N reversed), detected
  from the keys; the attention weights may be [C, C] or [C, C, 1, 1] in either. Keys under
  "first_stage_model." (a full Stable Diffusion checkpoint) are taken with the prefix
  stripped and all others ignored; latent-diffusion's "loss." / "model_ema." entries are
  ignored.

  The tree is checked against `jax.eval_shape(module.init, ...)` on an `image_size`²
  image (names and shapes; parameters do not depend on the size): missing, unexpected
  and mis-shaped keys are one ValueError naming them in the file's own names.
  """
  if any(k.startswith(_FULL_MODEL_PREFIX) for k in state_dict):
    state_dict = {k[len(_FULL_MODEL_PREFIX):]: v for k, v in state_dict.items()
                  if k.startswith(_FULL_MODEL_PREFIX)}
  naming = _naming(state_dict.keys())
  table = _table(module, naming, image_size)   # torch key → (flax path, flax shape)
  expected = {k: _torch_shape(p, s, naming) for k, (p, s) in table.items()}
  given = dict(state_dict)
  for k, (path, shape) in table.items():   # attention weights: [C, C] ↔ [C, C, 1, 1]
    if k in given and len(shape) == 2 and path[-1] == "kernel":
      w_shape = tuple(np.shape(given[k]))
      if w_shape != expected[k] and w_shape in ((shape[1], shape[0]),
                                                (shape[1], shape[0], 1, 1)):
        given[k] = np.reshape(torch_weights.to_numpy(given[k]), expected[k])
  what = {"ldm": "a latent-diffusion (CompVis / BFL) AutoencoderKL state dict",
          "diffusers": "a diffusers AutoencoderKL state dict",
          "diffusers_old": "a diffusers AutoencoderKL state dict (old attention names)"}[naming]
  what += (f" for block_out_channels={tuple(module.block_out_channels)}, "
           f"latent_channels={module.latent_channels}, "
           f"use_quant_conv={module.use_quant_conv}, "
           f"use_post_quant_conv={module.use_post_quant_conv}")
  arrays = torch_weights.check_state_dict(
      given, expected, what,
      ignore_prefixes=_LDM_IGNORED_PREFIXES if naming == "ldm" else ())
  params: dict = {}
  for k, (path, shape) in table.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = _to_flax(path, arrays[k], shape).astype(np.float32)
  return {"params": params}


def load_pretrained(path, preset: str, dtype=jnp.float32, param_dtype=jnp.float32):
  """A published autoencoder's weight file → (module, variables, scale, shift).

  `path`: a `.safetensors` (read with the safetensors library: no torch, no pickle),
  `.pth`/`.pt` (torch) or `.npz` the user has (never downloaded), in diffusers' or
  latent-diffusion's key names (`params_from_state_dict`); `preset`: a key of PRESETS
  ("sd", "sdxl", "flux"), the file's architecture and latent normalisation
  z_scaled = scale·(z − shift). Variables are on the default device in `param_dtype`
  (GroupNorm parameters float32)."""
  spec = _preset(preset)
  module = from_preset(preset, dtype, param_dtype)
  variables = params_from_state_dict(torch_weights.read_state_dict(os.fspath(path)), module)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 64, 64, module.in_channels), jnp.float32))
  variables = jax.tree.map(lambda a, s: jnp.asarray(a, s.dtype), variables, shapes)
  return module, variables, float(spec["scale"]), float(spec["shift"])
