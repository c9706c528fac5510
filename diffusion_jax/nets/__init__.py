"""Stateless flax.linen networks, and their builders from config.model.

    UNet, DiT, Classifier      the denoisers and the noise-conditional classifier
    build_denoiser / build_dit / build_classifier (config.model, ...) -> nn.Module
    unet, dit, classifier, layers, gan, clip, inception, vgg, lpips, torch_weights
    vae                        the VAE's MLP / conv encoders and decoders (config.vae)
    autoencoder                the KL autoencoder of latent diffusion (diffusers' AutoencoderKL)
                               and the published SD / SDXL / FLUX autoencoders' weights

`clip` (the CLIP dual encoder) is imported on first use: it reads the tokenizer's
constants from `data.text`, and with it the data package (TFDS, grain), which the other
networks do not need.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

import flax.linen as nn
import jax.numpy as jnp
from jax.typing import DTypeLike

from diffusion_jax.nets import (adapters, autoencoder, classifier, dit, gan, inception, layers,
                                lpips, torch_weights, unet, vae, vgg)
from diffusion_jax.nets.classifier import Classifier
from diffusion_jax.nets.dit import DiT
from diffusion_jax.nets.unet import UNet

if TYPE_CHECKING:
  from ml_collections import ConfigDict

  from diffusion_jax.nets import clip

__all__ = ["DTYPES", "Classifier", "DiT", "UNet", "adapters", "autoencoder", "build_classifier",
           "build_denoiser", "build_dit", "classifier", "clip", "dit", "dit_size", "dtype",
           "gan", "inception", "layers", "lpips", "torch_weights", "unet", "unet_options",
           "vae", "vgg"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def __getattr__(name: str) -> ModuleType:
  if name == "clip":  # imported on first use (see the module docstring)
    return importlib.import_module(f"{__name__}.clip")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype(name: str, key: str = "model.dtype") -> DTypeLike:
  """Config dtype name → jnp dtype, with an error naming the key."""
  if name not in DTYPES:
    raise ValueError(f"{key}={name!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def build_denoiser(model_cfg: ConfigDict, out_channels: int, num_classes: int) -> nn.Module:
  """config.model → a denoiser network (x, t, labels, train=) -> prediction; with
  model.guidance_input also the keyword guidance=w [B] (guidance distillation)."""
  if model_cfg.name == "unet":
    return UNet(out_channels=out_channels, channels=model_cfg.channels,
                channel_mult=tuple(model_cfg.channel_mult),
                num_res_blocks=model_cfg.num_res_blocks,
                attn_resolutions=tuple(model_cfg.attn_resolutions),
                num_heads=model_cfg.num_heads, dropout=model_cfg.dropout,
                num_classes=num_classes, guidance_input=model_cfg.guidance_input,
                **unet_options(model_cfg))
  if model_cfg.name == "dit":
    return build_dit(model_cfg, out_channels, num_classes)
  raise ValueError(f"model.name={model_cfg.name!r}: expected one of ['unet', 'dit']")


def dit_size(model_cfg: ConfigDict) -> dict:
  """hidden_size, depth, num_heads, patch_size: from model.variant ('XL/2') when set,
  else from the keys of the same names."""
  if model_cfg.variant:
    return dit.variant(model_cfg.variant)
  return dict(hidden_size=model_cfg.hidden_size, depth=model_cfg.depth,
              num_heads=model_cfg.num_heads, patch_size=model_cfg.patch_size)


def build_dit(model_cfg: ConfigDict, out_channels: int, num_classes: int) -> dit.DiT:
  return dit.DiT(out_channels=out_channels, mlp_ratio=model_cfg.mlp_ratio,
                 num_classes=num_classes, text_attention=model_cfg.text_attention,
                 scan=model_cfg.scan, remat=model_cfg.remat,
                 attention_impl=model_cfg.attention_impl, guidance_input=model_cfg.guidance_input,
                 dtype=dtype(model_cfg.dtype), param_dtype=dtype(model_cfg.param_dtype),
                 **dit_size(model_cfg))


def build_classifier(model_cfg: ConfigDict, num_classes: int) -> Classifier:
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


def unet_options(model_cfg: ConfigDict) -> dict:
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
