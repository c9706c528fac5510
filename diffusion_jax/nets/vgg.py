"""VGG16's convolutional features (Simonyan & Zisserman 2015): the perceptual network.

torchvision's `vgg16().features` without its last max-pool: five stages of 3×3 convs
(stride 1, padding 1, with bias) each followed by ReLU,

    stage:     1    2    3    4    5
    convs:     2    2    3    3    3
    channels:  64   128  256  512  512

with a 2×2 max-pool of stride 2 (floor, as torch) before stages 2–5. x [B, H, W, 3]
(already normalised the way the weights expect) → the last ReLU of each stage,
[relu1_2, relu2_2, relu3_3, relu4_3, relu5_3], of shapes [B, H/2ᵏ, W/2ᵏ, C_k] (k = 0..4,
floored at each pool), so H, W ≥ 16. 14,714,688 parameters.

LPIPS (`diffusion_jax.nets.lpips`) is built on it and is what a perceptual loss
should usually call; this module is the bare feature stack. `params_from_torch`
turns torchvision's state dict (`features.N.weight` OIHW, `features.N.bias`) into
this module's params (HWIO kernels).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.nets import torch_weights

STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
CHANNELS = tuple(s[-1] for s in STAGES)   # of the five returned activations
MIN_SIZE = 2 ** (len(STAGES) - 1)         # four pools must leave at least 1×1


def _layers() -> tuple[tuple[str, int, int, int], ...]:
  """(flax name, index in torchvision's `features` Sequential, in channels, out
  channels) per conv. Each conv is followed by a ReLU and each stage by a MaxPool,
  and each of those takes an index of the Sequential too."""
  layers, i, cin = [], 0, 3
  for s, stage in enumerate(STAGES):
    for c, cout in enumerate(stage):
      layers.append((f"conv{s + 1}_{c + 1}", i, cin, cout))
      i, cin = i + 2, cout
    i += 1
  return tuple(layers)


LAYERS = _layers()   # (conv1_1, 0, 3, 64), (conv1_2, 2, 64, 64), (conv2_1, 5, 64, 128), …


class VGG16Features(nn.Module):
  """x [B, H, W, 3] → [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3] (see the module
  docstring). Fresh kernels are initialised as torchvision does (He normal, fan-out,
  zero bias), which keeps activations at unit scale through the 13 layers."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.shape[1] < MIN_SIZE or x.shape[2] < MIN_SIZE:
      raise ValueError(f"VGG16 features need H, W >= {MIN_SIZE} (four 2×2 pools), got "
                       f"{x.shape[1]}×{x.shape[2]}: upsample the images first")
    h, outs = x.astype(self.dtype), []
    for s, stage in enumerate(STAGES):
      if s:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for c, ch in enumerate(stage):
        h = nn.relu(nn.Conv(ch, (3, 3), padding=1, dtype=self.dtype,
                            param_dtype=self.param_dtype,
                            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                            name=f"conv{s + 1}_{c + 1}")(h))
      outs.append(h)
    return outs


def params_from_torch(state_dict) -> dict:
  """torchvision `vgg16` state dict → this module's params {conv{s}_{c}: {kernel HWIO,
  bias}}, numpy float32. `classifier.*` (the ImageNet head) is ignored; any other
  missing or unexpected key, or a wrong shape, is an error naming it."""
  expected = {}
  for _, i, cin, cout in LAYERS:
    expected[f"features.{i}.weight"] = (cout, cin, 3, 3)
    expected[f"features.{i}.bias"] = (cout,)
  arrays = torch_weights.check_state_dict(state_dict, expected,
                                          "a torchvision vgg16 state dict",
                                          ignore_prefixes=("classifier.",))
  return {name: {"kernel": arrays[f"features.{i}.weight"].transpose(2, 3, 1, 0),  # OIHW → HWIO
                 "bias": arrays[f"features.{i}.bias"]}
          for name, i, _, _ in LAYERS}
