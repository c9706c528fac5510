"""LPIPS-VGG and the VGG16 features against a PyTorch reference (tests/nets/
torch_lpips.py) with identical random weights, plus checks that need no reference and
the weight converters.

Tolerances, float32 on both sides: LPIPS values to 1e-5 relative (measured ≤ 2e-7),
VGG features to 1e-5 of their largest magnitude (measured ≤ 3e-6), gradients wrt x,
back through all 13 convs, to 1e-4 of theirs (measured ≈ 1e-5).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
torch = pytest.importorskip("torch")  # the reference extra (.[reference])

import torch_lpips
from diffusion_jax.nets import lpips, torch_weights, vgg

RTOL = 1e-5


@pytest.fixture(scope="module")
def ref():
  """The torch reference: torchvision's VGG init and random non-negative lin weights."""
  torch.manual_seed(0)
  model = torch_lpips.LPIPS().eval()
  with torch.no_grad():
    for lin in model.lins:
      lin.model[1].weight.uniform_(0, 1)
  return model


@pytest.fixture(scope="module")
def variables(ref):
  return jax.tree.map(jnp.asarray, lpips.params_from_torch(ref.net.state_dict(),
                                                           ref.lin_state_dict()))


_lpips = jax.jit(lpips.lpips)
_features = jax.jit(lambda p, x: vgg.VGG16Features().apply({"params": p}, x))
_grad = jax.jit(jax.grad(lambda v, x, y: lpips.lpips(v, x, y).sum(), argnums=1))


def _pair(size, channels=3, seed=0):
  """x, y [2, size, size, C] in [-1, 1]: pair 0 unrelated, pair 1 y = x + noise."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (2, size, size, channels)).astype(np.float32)
  y = np.clip(x + 0.2 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  y[0] = rng.uniform(-1, 1, (size, size, channels))
  return x, y


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _rel_err(a, b):
  """max |a − b| / max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


def test_vgg16_parameter_count():
  shapes = jax.eval_shape(vgg.VGG16Features().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 14_714_688
  assert [n for n, *_ in vgg.LAYERS] == [f"conv{s}_{c}" for s, n in enumerate((2, 2, 3, 3, 3), 1)
                                         for c in range(1, n + 1)]
  assert [i for _, i, *_ in vgg.LAYERS] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


@pytest.mark.parametrize("size", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_matches_torch(ref, variables, size):
  x, y = _pair(size)
  with torch.no_grad():
    want = ref(_nchw(x), _nchw(y)).reshape(-1).numpy()
    want_feats = ref.net(_nchw(x))
  got = np.asarray(_lpips(variables, x, y))
  assert got.shape == (2,)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  feats = _features(variables["params"]["vgg"], x)
  assert [f.shape for f in feats] == [(2, size >> k, size >> k, c)
                                      for k, c in enumerate(vgg.CHANNELS)]
  for k, (f, w) in enumerate(zip(feats, want_feats)):
    assert _rel_err(f, w.permute(0, 2, 3, 1).numpy()) < RTOL, k


def test_grayscale_odd_size_matches_torch(ref, variables):
  """C = 1 is compared as 3 equal channels; 28 → 14 → 7 → 3 → 1 floors like torch."""
  x, y = _pair(28, channels=1)
  with torch.no_grad():
    want = ref(_nchw(x).repeat(1, 3, 1, 1), _nchw(y).repeat(1, 3, 1, 1)).reshape(-1).numpy()
  np.testing.assert_allclose(np.asarray(_lpips(variables, x, y)), want, rtol=RTOL)


def test_gradient_matches_torch(ref, variables):
  x, y = _pair(32)
  tx = _nchw(x).requires_grad_()
  ref(tx, _nchw(y)).sum().backward()
  g = np.asarray(_grad(variables, x, y))
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
  assert _rel_err(g, tx.grad.permute(0, 2, 3, 1).numpy()) < 10 * RTOL


def test_metric_properties(variables):
  x, y = _pair(32)
  d = np.asarray(_lpips(variables, x, y))
  assert np.all(d > 0)
  assert d[0] > d[1]   # unrelated noise is further than a noisy copy
  # One call, same compiled shape: d(x₀, x₀) = 0 exactly, and d(y₁, x₁) = d(x₁, y₁).
  e = np.asarray(_lpips(variables, np.stack([x[0], y[1]]), np.stack([x[0], x[1]])))
  assert e[0] == 0.0
  np.testing.assert_allclose(e[1], d[1], rtol=1e-6)


def test_unit_normalise_zero_features_have_finite_gradient():
  f = jnp.zeros((2, 8)).at[0].set(jnp.arange(8.0))
  out = jax.jit(lpips.unit_normalise)(f)
  np.testing.assert_allclose(out[0], np.arange(8.0) / np.sqrt(140.0), rtol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  g = jax.jit(jax.grad(lambda f: jnp.sum(lpips.unit_normalise(f) * jnp.arange(8.0))))(f)
  assert np.all(np.isfinite(g))


def test_bad_inputs(variables):
  x = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="H, W >= 16"):
    lpips.lpips(variables, x, x)
  with pytest.raises(ValueError, match="one shape"):
    lpips.lpips(variables, np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 16, 1)))
  with pytest.raises(ValueError, match="1 or 3"):
    lpips.lpips(variables, np.zeros((1, 16, 16, 4)), np.zeros((1, 16, 16, 4)))


def _state_dicts(ref):
  vgg_sd = {k: v.clone() for k, v in ref.net.state_dict().items()}
  vgg_sd["classifier.0.weight"] = torch.zeros(4, 3)   # torchvision's head: ignored
  return vgg_sd, ref.lin_state_dict()


def test_converter_errors(ref):
  vgg_sd, lin_sd = _state_dicts(ref)
  with pytest.raises(ValueError, match=r"not a torchvision vgg16 state dict:\n"
                                       r"  1 missing keys: features\.28\.bias"):
    lpips.params_from_torch({k: v for k, v in vgg_sd.items() if k != "features.28.bias"},
                            lin_sd)
  with pytest.raises(ValueError, match=r"1 unexpected keys: features\.1\.weight"):
    lpips.params_from_torch({**vgg_sd, "features.1.weight": torch.zeros(1)}, lin_sd)
  with pytest.raises(ValueError, match=r"features\.5\.weight: got \(128, 32, 3, 3\), "
                                       r"expected \(128, 64, 3, 3\)"):
    lpips.params_from_torch({**vgg_sd, "features.5.weight": torch.zeros(128, 32, 3, 3)}, lin_sd)
  with pytest.raises(ValueError, match=r"not an lpips vgg lin state dict.*:\n"
                                       r"  1 missing keys: lin4\.model\.1\.weight"):
    lpips.params_from_torch(vgg_sd, {k: v for k, v in lin_sd.items() if "lin4" not in k})
  with pytest.raises(ValueError, match=r"1 unexpected keys: net\.slice1\.0\.weight"):
    lpips.params_from_torch(vgg_sd, {**lin_sd, "net.slice1.0.weight": torch.zeros(1)})
  with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight: got \(1, 256\), "):
    lpips.params_from_torch(vgg_sd, {**lin_sd, "lin2.model.1.weight": torch.zeros(1, 256)})


def test_pth_and_npz_round_trips(ref, variables, tmp_path):
  vgg_sd, lin_sd = _state_dicts(ref)
  torch.save(vgg_sd, tmp_path / "vgg16.pth")
  torch.save(lin_sd, tmp_path / "vgg.pth")
  from_pth = lpips.load_weights(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
  jax.tree.map(np.testing.assert_array_equal, from_pth, variables)

  lpips.save_npz(tmp_path / "vgg16.npz", torch_weights.read_state_dict(tmp_path / "vgg16.pth"))
  lpips.save_npz(tmp_path / "lin.npz", lin_sd)
  assert not any(k.startswith("classifier.") for k in np.load(tmp_path / "vgg16.npz").files)
  from_npz = lpips.load_weights(tmp_path / "vgg16.npz", tmp_path / "lin.npz")
  jax.tree.map(np.testing.assert_array_equal, from_npz, variables)
