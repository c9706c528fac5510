"""Stateless flax.linen networks."""
import jax.numpy as jnp

from diffusion_jax.nets.classifier import Classifier
from diffusion_jax.nets.unet import UNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype(name: str):
  """Config dtype name → jnp dtype, with an error naming the key."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def build_denoiser(model_cfg, out_channels: int, num_classes: int):
  """config.model → a denoiser network (x, t, labels, train=) -> prediction."""
  if model_cfg.name == "unet":
    return UNet(out_channels=out_channels, channels=model_cfg.channels,
                channel_mult=tuple(model_cfg.channel_mult),
                num_res_blocks=model_cfg.num_res_blocks,
                attn_resolutions=tuple(model_cfg.attn_resolutions),
                num_heads=model_cfg.num_heads, dropout=model_cfg.dropout,
                num_classes=num_classes, dtype=dtype(model_cfg.dtype))
  raise ValueError(f"model.name={model_cfg.name!r}: expected one of ['unet']")


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
                    dtype=dtype(model_cfg.dtype))
