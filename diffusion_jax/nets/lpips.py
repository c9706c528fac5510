"""LPIPS, the learned perceptual image patch similarity (Zhang et al. 2018, "The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), as the `lpips`
package v0.1 computes it with net='vgg':

    d(x, y) = Σ_l mean_{h,w} Σ_c w_lc (x̂_l − ŷ_l)²_hwc,    x̂_l = f_l / (‖f_l‖₂ + 1e-10),

f_l = the l-th VGG16 activation (relu1_2 … relu5_3, `nets.vgg`) of the scaled image
(x − shift)/scale, shift = [−.030, −.088, −.188], scale = [.458, .448, .450] per RGB
channel (the package's ScalingLayer: ImageNet's normalisation for inputs in [-1, 1]);
the norm is over channels at each position; w_l ≥ 0 are the learned 1×1 `lin` weights
(no bias).

It lives in `nets`, beside the VGG it is built on, because it is a network with
parameters that two higher layers use: the VAE's perceptual loss and evaluation.

Usage (nothing is downloaded; point at files you have: torchvision's ImageNet
`vgg16-397923af.pth` and the lpips package's `lpips/weights/v0.1/vgg.pth`):

    from diffusion_jax.nets import lpips
    variables = lpips.load_weights("vgg16-397923af.pth", "vgg.pth")   # or the .npz below
    d = jax.jit(lpips.lpips)(variables, x, y)    # x, y [B, H, W, 3] in [-1, 1] → [B]

As a loss, call `lpips.lpips(variables, x, y)` inside the jitted step with `variables`
passed in (not differentiated) and take its mean; it is differentiable in x and y.
A `.pth` needs torch to read (`nets.torch_weights`); convert once, and later runs
need only numpy:

    from diffusion_jax.nets import torch_weights
    lpips.save_npz("vgg16.npz", torch_weights.read_state_dict("vgg16-397923af.pth"))
    lpips.save_npz("lpips_vgg.npz", torch_weights.read_state_dict("vgg.pth"))
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.nets import torch_weights, vgg

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


def unit_normalise(f, eps: float = EPS):
  """f / (‖f‖₂ + eps) over the last (channel) axis, as the package's normalize_tensor.

  After a ReLU a position can have all channels 0; there √ has an infinite derivative
  and the gradient would be 0·∞ = NaN. The inner `where` keeps √ off 0 and the outer
  one gives the same value (0) as √0, so values are unchanged and gradients finite."""
  sq = jnp.sum(f * f, axis=-1, keepdims=True)
  nonzero = sq > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
  return f / (norm + eps)


class LPIPS(nn.Module):
  """(x, y) [B, H, W, C] in [-1, 1], C ∈ {1, 3}, H, W ≥ 16 → d [B] float32 (the module
  docstring's equation). Grayscale (C = 1) images are repeated to 3 channels, so a
  gray image is compared as the RGB image with equal channels.

  Params: {"vgg": VGG16Features params, "lin0".."lin4": w_l [C_l]}. Fresh lin weights
  are ones, the package's uncalibrated lpips=False baseline; LPIPS proper needs the
  learned ones (`load_weights`). x and y go through VGG as one batch of 2B."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"LPIPS compares two image batches [B, H, W, 1 or 3] of one "
                       f"shape, got {x.shape} and {y.shape}")
    if x.shape[-1] == 1:
      x, y = jnp.repeat(x, 3, axis=-1), jnp.repeat(y, 3, axis=-1)
    h = jnp.concatenate([x, y]).astype(jnp.float32)
    h = (h - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    feats = vgg.VGG16Features(self.dtype, self.param_dtype, name="vgg")(h)
    d = jnp.zeros(x.shape[0], jnp.float32)
    for k, f in enumerate(feats):
      w = self.param(f"lin{k}", nn.initializers.ones, (f.shape[-1],), self.param_dtype)
      # Normalised in float32: with bf16 features the squared sum over 512 channels
      # would lose the small differences LPIPS measures.
      fx, fy = jnp.split(unit_normalise(f.astype(jnp.float32)), 2)
      d = d + jnp.mean(jnp.sum((fx - fy) ** 2 * w.astype(jnp.float32), axis=-1), axis=(1, 2))
    return d


def lpips(variables, x, y):
  """LPIPS distance d [B] between image batches x, y [B, H, W, C] in [-1, 1] (see
  `LPIPS`), float32. Pure: wrap in jax.jit, or call inside a jitted loss."""
  return LPIPS().apply(variables, x, y)


def params_from_torch(vgg_state_dict, lin_state_dict) -> dict:
  """torchvision's `vgg16` state dict and the lpips package's `vgg.pth` state dict
  (`lin{k}.model.1.weight` [1, C_k, 1, 1]) → LPIPS variables {"params": …} as numpy
  float32. Missing or unexpected keys and wrong shapes are errors naming them."""
  expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(vgg.CHANNELS)}
  lins = torch_weights.check_state_dict(
      lin_state_dict, expected, "an lpips vgg lin state dict (lpips/weights/v0.1/vgg.pth)")
  params = {"vgg": vgg.params_from_torch(vgg_state_dict)}
  params.update({f"lin{k}": w.reshape(-1) for k, w in enumerate(lins.values())})
  return {"params": params}


def save_npz(path, state_dict) -> None:
  """Writes a state dict (torch tensors or arrays) to `path` (.npz) with the same keys,
  leaving out torchvision's `classifier.*`: the ImageNet head, 90% of vgg16's 528 MB,
  which nothing here uses."""
  torch_weights.save_npz(path, state_dict, skip_prefixes=("classifier.",))


def load_weights(vgg_path, lin_path) -> dict:
  """Two weight files (.pth or .npz each: torchvision's vgg16 and the lpips package's
  vgg lin weights) → LPIPS variables on the default device, for `lpips`."""
  variables = params_from_torch(torch_weights.read_state_dict(vgg_path),
                                torch_weights.read_state_dict(lin_path))
  return jax.tree.map(jnp.asarray, variables)
