"""Reading published PyTorch weight files: the one place the ported networks (FID's
Inception-v3, LPIPS's VGG16, the latent autoencoders) touch torch.

Nothing is downloaded: the user points at a file they have (a local path or a cloud
URI, gs://..., read through `io.path`). A `.safetensors` (diffusers'
and most current releases) is read with the safetensors library, without torch and
without unpickling. A `.pth` needs torch only to be read; `save_npz` writes the same
state dict as a torch-free `.npz`, so one conversion on a machine with torch leaves every
later run needing only numpy. Each network's converter checks keys and shapes with
`check_state_dict` first, so a wrong file is an error naming what differs, not a
silently broken network.
"""
from __future__ import annotations

import io as _io
import os
from collections.abc import Mapping

import numpy as np

from diffusion_jax import io

_LIST = 20   # names shown per kind of mismatch; a wrong file can differ in hundreds


def to_numpy(v) -> np.ndarray:
  """A torch tensor (any device or dtype, requires_grad or not) or an array → numpy
  float32. `.float()` first: numpy has no bfloat16, so `.numpy()` alone would fail."""
  if hasattr(v, "detach"):
    v = v.detach().cpu().float().numpy()
  return np.asarray(v, np.float32)


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A `.safetensors` (read with the safetensors library; no torch, no pickle), a
  `.pth`/`.pt` (torch.save of a state dict; needs torch) or an `.npz` (from `save_npz`;
  needs only numpy) → {key: float32 array}; float16 / bfloat16 tensors are converted
  exactly. Never downloads (a cloud file is read from its bucket)."""
  path = os.fspath(path)
  if not path.endswith((".safetensors", ".pth", ".pt", ".npz")):
    raise ValueError(f"{path}: expected a .safetensors, .pth/.pt (torch) or .npz weight file")
  if not io.path(path).exists():
    raise FileNotFoundError(f"{path}: no such file (nothing is downloaded here: point "
                            "at a weight file you have)")
  if path.endswith(".npz"):
    with io.path(path).open("rb") as fh, np.load(fh) as f:
      return {k: to_numpy(f[k]) for k in f.files}
  if path.endswith(".safetensors"):
    with io.local_file(path) as local:
      return _read_safetensors(local, path)
  try:
    import torch  # lazily: only reading a .pth needs it
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs torch: `pip install torch` (the CPU build is enough), or "
        "convert it once to .npz where torch is installed, with "
        "diffusion_jax.nets.torch_weights.save_npz('out.npz', "
        f"read_state_dict('{path}')), and load the .npz") from e
  with io.path(path).open("rb") as f:
    state_dict = torch.load(f, map_location="cpu", weights_only=True)
  return {k: to_numpy(v) for k, v in state_dict.items()}


def _read_safetensors(local: str, path: str) -> dict[str, np.ndarray]:
  # numpy has no bfloat16 (nor float8) of its own: importing ml_dtypes (a JAX dependency)
  # registers them, so safetensors' numpy reader can return such tensors, which astype
  # widens to float32 exactly. (safetensors.numpy.load_file has no BF16 entry at all.)
  import ml_dtypes  # noqa: F401
  from safetensors import SafetensorError, safe_open
  try:
    with safe_open(local, framework="numpy") as f:
      return {k: np.asarray(f.get_tensor(k)).astype(np.float32) for k in f.keys()}
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable .safetensors file ({e})") from e


def save_npz(path, state_dict: Mapping, skip_prefixes: tuple[str, ...] = ()) -> None:
  """Writes a state dict (torch tensors or arrays) to `path` (.npz, appended when
  missing, as numpy does; local or cloud, atomically: `io.write_atomic`) as float32
  with the same keys, leaving out those starting with `skip_prefixes` (heads nothing
  here uses)."""
  path = os.fspath(path)
  buf = _io.BytesIO()
  np.savez(buf, **{k: to_numpy(v) for k, v in state_dict.items()
                   if not k.startswith(tuple(skip_prefixes))})
  io.write_atomic(path if path.endswith(".npz") else path + ".npz", buf.getvalue())


def check_state_dict(state_dict: Mapping, expected: Mapping[str, tuple], what: str,
                     ignore_suffixes: tuple[str, ...] = ("num_batches_tracked",),
                     ignore_prefixes: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Checks `state_dict` has exactly the keys of `expected` (key → torch-layout shape),
  keys ending with `ignore_suffixes` or starting with `ignore_prefixes` aside, and
  returns {key: float32 array} in `expected`'s order.

  Raises ValueError "not {what}:" listing every missing key, unexpected key and shape
  mismatch (the first 20 of each), so one run shows all that is wrong with a file."""
  given = {k: v for k, v in state_dict.items()
           if not k.endswith(tuple(ignore_suffixes)) and not k.startswith(tuple(ignore_prefixes))}
  missing = sorted(expected.keys() - given.keys())
  unexpected = sorted(given.keys() - expected.keys())
  mismatched = [f"{k}: got {tuple(np.shape(given[k]))}, expected {tuple(expected[k])}"
                for k in sorted(given.keys() & expected.keys())
                if tuple(np.shape(given[k])) != tuple(expected[k])]
  if missing or unexpected or mismatched:
    lines = [f"not {what}:"]
    for kind, items in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", mismatched)):
      if items:
        lines.append(f"  {len(items)} {kind}: " + ", ".join(items[:_LIST])
                     + (", ..." if len(items) > _LIST else ""))
    raise ValueError("\n".join(lines))
  return {k: to_numpy(given[k]) for k in expected}
