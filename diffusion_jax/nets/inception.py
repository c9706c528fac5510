"""The FID Inception-v3 network (Szegedy et al. 2016, "Rethinking the Inception
Architecture"; FID: Heusel et al. 2017), exactly as pytorch-fid computes it.

pytorch-fid (`fid_inception_v3()` + its `InceptionV3` wrapper, output block 3) runs
torchvision's `Inception3(num_classes=1008, aux_logits=False)` with the TensorFlow
graph's quirks patched in, and loads the weights ported from TF's
`inception-2015-12-05` graph (`pt_inception-2015-12-05-6726825d.pth`):
  * the average pools in the branch_pool of Mixed_5b..5d, 6b..6e and 7b exclude the
    zero padding from the mean (`count_include_pad=False`, as TF's `SAME` pooling);
  * Mixed_7c's branch_pool is a 3×3/1 *max* pool (a quirk of that TF graph);
  * BasicConv2d = conv (no bias) → BatchNorm(eps=1e-3, running statistics) → ReLU.

Input: x [B, H, W, 3] in [-1, 1], any H, W. It is resized to 299×299 bilinearly
with half-pixel centres and no antialiasing, which is torch's
`F.interpolate(mode='bilinear', align_corners=False)` for up- and down-sampling.
pytorch-fid resizes the [0, 1] image and then maps it to [-1, 1]; resizing is linear
with weights summing to 1, so resizing the [-1, 1] image directly is the same.

Output: (pool [B, 2048], logits [B, 1008]), float32. `pool` is the global average of
Mixed_7c (the FID / KID / precision-recall features); `logits = fc(pool)` over the TF
graph's 1008 classes (the 1000 ImageNet classes plus unused entries), for the Inception
Score. `dtype` sets the compute dtype; published FIDs are float32 numbers, so compare
only float32 features with them.

Parameters mirror the torch state-dict names: torch `Mixed_5b.branch1x1.conv.weight`
is `params['Mixed_5b']['branch1x1']['conv']['kernel']`, BatchNorm running statistics
live in `batch_stats` (not folded, so the conversion is exact and invertible).
`params_from_torch` converts a pytorch-fid state dict; `load_weights` reads the `.pth`
(needs torch) or a `.npz` written by `save_npz` (both through `nets.torch_weights`), so
evaluation needs torch only for the one conversion:

  python -c "from diffusion_jax.nets import inception; inception.convert(
      'pt_inception-2015-12-05-6726825d.pth', 'fid_inception.npz')"
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.nets import torch_weights

RESOLUTION = 299
NUM_CLASSES = 1008


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """conv (no bias) → BatchNorm(eps=1e-3, running statistics) → ReLU, NHWC."""
  features: int
  kernel: int | Sequence[int]
  stride: int = 1
  padding: int | Sequence[int] = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x):
  # TF's SAME average pool: the mean over the in-image part of each 3×3 window.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool(x, stride: int, padding: int = 0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


class _Block(nn.Module):
  """Base of the mixed blocks: `self.conv(name, features, kernel, stride, padding)`."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def conv(self, name, features, kernel, stride=1, padding=0):
    return BasicConv2d(features, kernel, stride, padding, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)


class InceptionA(_Block):
  """Mixed_5b/5c/5d (35×35): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avgpool→1×1."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48, 1)(x))
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (35→17): 3×3/2 | 1×1→3×3→3×3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
    bd = self.conv("branch3x3dbl_1", 64, 1)(x)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
    bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b..6e (17×17): factorised 7×7 convolutions (1×7 and 7×1)."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv("branch7x7dbl_1", c7, 1)(x)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (17→8): 1×1→3×3/2 | 1×1→1×7→7×1→3×3/2 | maxpool/2."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192, 1)(x))
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b/7c (8×8): expanded 1×3 + 3×1 branches. `max_pool`: Mixed_7c's
  branch_pool is a 3×3/1 max pool (padded with −∞) in the FID graph, not an average."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448, 1)(x)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    pooled = _max_pool(x, 1, padding=1) if self.max_pool else _avg_pool_same(x)
    bp = self.conv("branch_pool", 192, 1)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x, size: int = RESOLUTION):
  """x [B, H, W, C] → [B, size, size, C], float32: torch's
  `F.interpolate(mode='bilinear', align_corners=False)` (half-pixel centres, edge
  clamped, no antialiasing when downsampling)."""
  x = x.astype(jnp.float32)
  if x.shape[1:3] == (size, size):
    return x
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bilinear",
                          antialias=False)


class InceptionV3(nn.Module):
  """x [B, H, W, 3] in [-1, 1] → (pool [B, 2048], logits [B, 1008]), both float32.

  Use with the variables from `load_weights` / `params_from_torch`:
  `pool, logits = InceptionV3().apply(variables, x)`.
  """
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = resize_bilinear(x).astype(self.dtype)
    x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3", **kw)(x)     # 149
    x = BasicConv2d(32, 3, name="Conv2d_2a_3x3", **kw)(x)               # 147
    x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3", **kw)(x)
    x = _max_pool(x, 2)                                                  # 73
    x = BasicConv2d(80, 1, name="Conv2d_3b_1x1", **kw)(x)
    x = BasicConv2d(192, 3, name="Conv2d_4a_3x3", **kw)(x)              # 71
    x = _max_pool(x, 2)                                                  # 35
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)                             # 17
    x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
    x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)                             # 8
    x = InceptionE(name="Mixed_7b", **kw)(x)
    x = InceptionE(max_pool=True, name="Mixed_7c", **kw)(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, name="fc", **kw)(pool.astype(self.dtype))
    return pool, logits.astype(jnp.float32)


# --- torch state dict ↔ Flax variables ---------------------------------------------
# torch "<module>.<leaf>" → (collection, Flax leaf, transpose OIHW → HWIO / [out, in] →
# [in, out]). The module names (conv, bn, fc) and everything before them are the same.
_LEAVES = {
    "conv.weight": ("params", "kernel", (2, 3, 1, 0)),
    "bn.weight": ("params", "scale", None),
    "bn.bias": ("params", "bias", None),
    "bn.running_mean": ("batch_stats", "mean", None),
    "bn.running_var": ("batch_stats", "var", None),
    "fc.weight": ("params", "kernel", (1, 0)),
    "fc.bias": ("params", "bias", None),
}
_TORCH_LEAF = {(c, leaf.split(".")[0], name): leaf for leaf, (c, name, _) in _LEAVES.items()}


def _torch_items(variables: Mapping):
  """Yields (torch key, Flax value, the torch → Flax transpose) over the variables."""
  for collection in ("params", "batch_stats"):
    for path, value in jax.tree_util.tree_flatten_with_path(variables[collection])[0]:
      names = [p.key for p in path]
      leaf = _TORCH_LEAF[(collection, names[-2], names[-1])]
      yield ".".join(names[:-2] + [leaf]), value, _LEAVES[leaf][2]


def _untranspose(shape_or_array, perm):
  if perm is None:
    return shape_or_array
  inverse = tuple(np.argsort(perm))
  if isinstance(shape_or_array, tuple):
    return tuple(shape_or_array[i] for i in inverse)
  return shape_or_array.transpose(inverse)


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """torch key → torch-layout shape, read off the Flax module's own variables."""
  shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32))
  return {k: _untranspose(tuple(v.shape), perm) for k, v, perm in _torch_items(shapes)}


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
  """pytorch-fid state dict (torch key → array, OIHW / [out, in] layout) → Flax
  variables {'params': ..., 'batch_stats': ...} for `InceptionV3`, float32.

  Raises ValueError naming every missing or unexpected key and every shape mismatch
  (`torch_weights.check_state_dict`); `*.num_batches_tracked` entries are ignored.
  """
  arrays = torch_weights.check_state_dict(state_dict, _expected_shapes(),
                                          "a pytorch-fid Inception-v3 state dict")
  variables: dict = {}
  for key, value in arrays.items():
    module, leaf = key.rsplit(".", 2)[-2:]
    collection, name, perm = _LEAVES[f"{module}.{leaf}"]
    node = variables.setdefault(collection, {})
    for p in key.split(".")[:-1]:
      node = node.setdefault(p, {})
    node[name] = jnp.asarray(value.transpose(perm) if perm else value)
  return variables


def state_dict_from_variables(variables: Mapping) -> dict[str, np.ndarray]:
  """Flax variables → flat torch-layout state dict, numpy float32 (the inverse of
  `params_from_torch`)."""
  return {k: _untranspose(np.asarray(v, np.float32), perm)
          for k, v, perm in _torch_items(variables)}


def save_npz(path: str, variables_or_state_dict: Mapping) -> None:
  """Writes the flat torch-layout state dict (torch key → array) to `path` (.npz).
  Accepts Flax variables or a (torch) state dict, which is converted first so a bad
  one raises before anything is written."""
  variables = variables_or_state_dict
  if "params" not in variables:
    variables = params_from_torch(variables)
  torch_weights.save_npz(path, state_dict_from_variables(variables))


def load_weights(path: str) -> dict:
  """Flax variables from pytorch-fid's `.pth` (torch.save'd state dict; needs torch)
  or from a `.npz` written by `save_npz` (needs only numpy). Never downloads."""
  try:
    state_dict = torch_weights.read_state_dict(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{e}. pytorch-fid's weights are pt_inception-2015-12-05-6726825d.pth (from the "
        "pytorch-fid GitHub releases)") from None
  return params_from_torch(state_dict)


def convert(src: str, dst: str) -> None:
  """One-time conversion of pytorch-fid's `.pth` to a torch-free `.npz`."""
  save_npz(dst, load_weights(src))
