"""Stateless flax.linen networks."""
import jax.numpy as jnp

from diffusion_jax.nets import dit
from diffusion_jax.nets import gan  # noqa: F401  (nets.gan)
from diffusion_jax.nets.classifier import Classifier
from diffusion_jax.nets.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str, key: str = "model.dtype"):
  """Config dtype name → jnp dtype, with an error naming the key."""
  if name not in DTYPES:
    raise ValueError(f"{key}={name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def build_denoiser(model_cfg, out_channels: int, num_classes: int):
  """config.model → a denoiser network (x, t, labels, train=) -> prediction."""
  if model_cfg.name == "unet":
    return UNet(out_channels=out_channels, channels=model_cfg.channels,
                channel_mult=tuple(model_cfg.channel_mult),
                num_res_blocks=model_cfg.num_res_blocks,
                attn_resolutions=tuple(model_cfg.attn_resolutions),
                num_heads=model_cfg.num_heads, dropout=model_cfg.dropout,
                num_classes=num_classes, **unet_options(model_cfg))
  if model_cfg.name == "dit":
    return build_dit(model_cfg, out_channels, num_classes)
  raise ValueError(f"model.name={model_cfg.name!r}: expected one of ['unet', 'dit']")


def dit_size(model_cfg) -> dict:
  """hidden_size, depth, num_heads, patch_size: from model.variant ('XL/2') when set,
  else from the keys of the same names."""
  if model_cfg.variant:
    return dit.variant(model_cfg.variant)
  return dict(hidden_size=model_cfg.hidden_size, depth=model_cfg.depth,
              num_heads=model_cfg.num_heads, patch_size=model_cfg.patch_size)


def build_dit(model_cfg, out_channels: int, num_classes: int):
  return dit.DiT(out_channels=out_channels, mlp_ratio=model_cfg.mlp_ratio,
                 num_classes=num_classes, text_attention=model_cfg.text_attention,
                 scan=model_cfg.scan, remat=model_cfg.remat,
                 attention_impl=model_cfg.attention_impl, dtype=dtype(model_cfg.dtype),
                 param_dtype=dtype(model_cfg.param_dtype), **dit_size(model_cfg))


def build_classifier(model_cfg, num_classes: int):
  """config.model → the noise-conditional classifier (the U-Net's encoder half, same
  size keys) (x, t, train=, features=) -> logits [B, num_classes] or features."""
  if not num_classes:
    raise ValueError("a classifier needs a labelled dataset (config.data.name has no "
                     "class labels)")
  return Classifier(num_classes=num_classes, channels=model_cfg.channels,
                    channel_mult=tuple(model_cfg.channel_mult),
                    num_res_blocks=model_cfg.num_res_blocks,
                    attn_resolutions=tuple(model_cfg.attn_resolutions),
                    num_heads=model_cfg.num_heads, dropout=model_cfg.dropout,
                    **unet_options(model_cfg))


def unet_options(model_cfg) -> dict:
  """The U-Net / classifier block options of config.model (ADM / DDPM switches,
  remat, attention implementation, dtypes)."""
  if model_cfg.attention_impl == "cudnn" and model_cfg.dtype == "float32":
    raise ValueError("model.attention_impl='cudnn' needs model.dtype='bfloat16' or "
                     "'float16' (cuDNN flash attention has no float32 kernel)")
  return dict(scale_shift_norm=model_cfg.scale_shift_norm,
              num_head_channels=model_cfg.num_head_channels,
              resblock_updown=model_cfg.resblock_updown, remat=model_cfg.remat,
              attention_impl=model_cfg.attention_impl, dtype=dtype(model_cfg.dtype),
              param_dtype=dtype(model_cfg.param_dtype, "model.param_dtype"))
