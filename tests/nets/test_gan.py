"""GAN networks (nets/gan.py): shapes and ranges, dtypes, conditional BatchNorm, the
projection discriminator, AdaIN, StyleGAN noise, PatchGAN's receptive field, errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import base
from diffusion_jax.nets import gan

NUM_CLASSES = 10
LATENT = 8


def _config(**gan_kw):
  c = base()
  c.gan.latent_dim = LATENT
  c.gan.channels = 8
  c.gan.mlp_width = 16
  c.gan.mlp_depth = 2
  c.gan.style_dim = 16
  c.gan.mapping_depth = 2
  for k, v in gan_kw.items():
    if k.startswith("model."):
      setattr(c.model, k[6:], v)
    else:
      setattr(c.gan, k, v)
  return c


def _generator(shape, name, num_classes=NUM_CLASSES, **kw):
  return gan.build_generator(_config(generator=name, **kw), shape, num_classes)


def _discriminator(shape, name, num_classes=NUM_CLASSES, **kw):
  return gan.build_discriminator(_config(discriminator=name, **kw), shape, num_classes)


# Everything under jit (eager flax compiles op by op); one jitted function per network.
@functools.cache
def _g_apply(net):
  return jax.jit(lambda v, z, y, keys: net.apply(v, z, y, keys))


@functools.cache
def _d_apply(net):
  """(logits, φ) with the sown features of mlp / dcgan D (φ None for patchgan)."""
  def f(v, x, y):
    out, state = net.apply(v, x, y, mutable=["intermediates"])
    feats = state.get("intermediates", {}).get("features")
    return out, None if feats is None else feats[0]
  return jax.jit(f)


def _random_variables(net, *args, seed=0, **kw):
  """Random variables of net's shapes without compiling its initialiser: kernels
  N(0, 1/fan_in), norm and noise scales, CBN γ tables, StyleGAN's constant and BN
  running variances ~1 (1 + 0.1·N, variances 1 + 0.1·|N|), everything else 0.1·N."""
  shapes = jax.eval_shape(functools.partial(net.init, **kw), jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    p = jax.tree_util.keystr(path)
    n = rng.standard_normal(s.shape)
    if p.endswith("['var']"):
      v = 1 + 0.1 * np.abs(n)
    elif p.endswith("['kernel']"):
      v = n / np.sqrt(np.prod(s.shape[:-1]))
    elif p.endswith("['scale']") or "['scale']['embedding']" in p or p.endswith("['const']"):
      v = 1 + 0.1 * n
    else:
      v = 0.1 * n
    return jnp.asarray(v, s.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _inputs(shape, B=3, seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  z = jax.random.normal(k1, (B, LATENT))
  y = jax.random.randint(k2, (B,), 0, NUM_CLASSES)
  x = jax.random.uniform(k3, (B,) + shape, minval=-1, maxval=1)
  return z, y, x, jax.random.split(k4, B)


SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_and_ranges(shape):
  z, y, x, keys = _inputs(shape)
  for name in ("dcgan", "stylegan"):
    G = _generator(shape, name)
    out = _g_apply(G)(_random_variables(G, z, y), z, y, keys)
    assert out.shape == (3,) + shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    if name == "dcgan":  # tanh output
      assert np.all(np.abs(out) <= 1) and np.std(out) > 1e-3
  D = _discriminator(shape, "dcgan")
  logits, phi = _d_apply(D)(_random_variables(D, x, y), x, y)
  assert logits.shape == (3,) and logits.dtype == jnp.float32
  n = gan.upsampling_levels(shape, "k", "dcgan")
  # Downsampling by strided convolutions alone (no pooling): n of them, widths c … 2^(n−1)c.
  assert phi.shape == (3, shape[0] // 2 ** n * shape[1] // 2 ** n * 8 * 2 ** (n - 1))
  convs = [k for k in _random_variables(D, x, y)["params"] if k.startswith("conv_")]
  assert len(convs) == n
  layers = 1 if shape[0] == 8 else 2
  P = _discriminator(shape, "patchgan", patch_layers=layers, **{"model.class_conditional": False})
  patches, _ = _d_apply(P)(_random_variables(P, x, y), x, y)
  assert patches.shape == (3,) + gan.patch_shape(shape, layers)
  assert np.all(np.isfinite(patches))


def test_mlp_toy():
  shape = (1, 1, 2)
  z, y, x, _ = _inputs(shape)
  x = 5 * x  # toy data is not in [-1, 1]
  G = _generator(shape, "mlp")
  v = _random_variables(G, z, y)
  assert v["params"]["hidden_0"]["kernel"].shape == (LATENT + NUM_CLASSES, 16)  # z ‖ one-hot
  out = _g_apply(G)(v, 10 * z, y, None)
  assert out.shape == (3, 1, 1, 2) and np.abs(out).max() > 1  # linear output, no tanh
  for norm in ("batch", "layer", "none"):
    D = _discriminator(shape, "mlp", d_norm=norm)
    logits, phi = _d_apply(D)(_random_variables(D, x, y), x, y)
    assert logits.shape == (3,) and phi.shape == (3, 16) and np.all(np.isfinite(logits))


def test_dtypes():
  shape = (8, 8, 1)
  z, y, x, keys = _inputs(shape)
  for name in ("dcgan", "stylegan"):
    G32 = _generator(shape, name)
    G16 = _generator(shape, name, **{"model.dtype": "bfloat16"})
    v = _random_variables(G32, z, y)
    shapes = jax.eval_shape(G16.init, jax.random.key(0), z, y)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    ref, out = _g_apply(G32)(v, z, y, keys), _g_apply(G16)(v, z, y, keys)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.1 * np.abs(ref).max())
    assert np.abs(out - ref).max() > 0  # really computed in bf16
  D32 = _discriminator(shape, "dcgan")
  D16 = _discriminator(shape, "dcgan", **{"model.dtype": "bfloat16"})
  v = _random_variables(D32, x, y)
  ref, out = _d_apply(D32)(v, x, y)[0], _d_apply(D16)(v, x, y)[0]
  np.testing.assert_allclose(out, ref, atol=0.1 * np.abs(ref).max() + 0.05)
  for name, build in (("stylegan", _generator), ("dcgan", _discriminator), ("mlp", _generator),
                      ("patchgan", _discriminator)):
    net = build(shape, name, **{"model.param_dtype": "bfloat16"},
                **({"model.class_conditional": False, "patch_layers": 1}
                   if name == "patchgan" else {}))
    args = (x, y) if build is _discriminator else (z, y)
    params = jax.eval_shape(net.init, jax.random.key(0), *args)["params"]
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_conditional_batchnorm_formula():
  """out = γ_y (x − μ)/sqrt(σ² + ε) + β_y with the batch's statistics when train=True
  (and the running averages updated), the running averages when train=False."""
  cbn = gan.ConditionalBatchNorm(num_classes=3)
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 3)) * 2 + 1
  y = jnp.array([0, 1, 0, 2])
  v = _random_variables(cbn, x, y, train=True)
  out, state = jax.jit(lambda v: cbn.apply(v, x, y, train=True, mutable=["batch_stats"]))(v)
  xn = np.asarray(x, np.float64)
  mu, var = xn.mean(axis=(0, 1, 2)), xn.var(axis=(0, 1, 2))
  g = np.asarray(v["params"]["scale"]["embedding"])[y][:, None, None]
  b = np.asarray(v["params"]["shift"]["embedding"])[y][:, None, None]
  np.testing.assert_allclose(out, g * (xn - mu) / np.sqrt(var + 1e-5) + b, rtol=1e-5, atol=1e-5)
  rm, rv = (np.asarray(v["batch_stats"]["norm"][k]) for k in ("mean", "var"))
  np.testing.assert_allclose(state["batch_stats"]["norm"]["mean"], 0.9 * rm + 0.1 * mu, rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["norm"]["var"], 0.9 * rv + 0.1 * var, rtol=1e-5)
  out = jax.jit(lambda v: cbn.apply(v, x, y, train=False))(v)
  np.testing.assert_allclose(out, g * (xn - rm) / np.sqrt(rv + 1e-5) + b, rtol=1e-5, atol=1e-5)


def test_conditional_batchnorm_generator():
  """Same z: same label → the same image, different labels → different images."""
  shape = (8, 8, 1)
  z, y, _, _ = _inputs(shape)
  G = _generator(shape, "dcgan")
  v = _random_variables(G, z, y)
  assert v["params"]["norm_0"]["scale"]["embedding"].shape == (NUM_CLASSES, 8)
  zz = jnp.broadcast_to(z[:1], z.shape)
  out = _g_apply(G)(v, zz, jnp.array([1, 1, 2]), None)
  np.testing.assert_array_equal(out[0], out[1])
  assert np.abs(out[0] - out[2]).max() > 1e-3
  # Unconditional (class_conditional False): plain BatchNorm, labels ignored.
  U = _generator(shape, "dcgan", **{"model.class_conditional": False})
  vu = _random_variables(U, z, y)
  assert set(vu["params"]["norm_0"]) == {"scale", "bias"}
  out = _g_apply(U)(vu, zz, jnp.array([1, 1, 2]), None)
  np.testing.assert_array_equal(out[0], out[2])


@pytest.mark.parametrize("name,shape", [("dcgan", (8, 8, 1)), ("mlp", (1, 1, 2))])
def test_projection_discriminator(name, shape):
  """logit(x, y) − logit(x, y') = ⟨e_y − e_y', φ(x)⟩."""
  _, y, x, _ = _inputs(shape)
  D = _discriminator(shape, name)
  v = _random_variables(D, x, y)
  y2 = jnp.array([4, 7, y[2]])
  l1, phi = _d_apply(D)(v, x, y)
  l2, phi2 = _d_apply(D)(v, x, y2)
  np.testing.assert_array_equal(phi, phi2)
  e = np.asarray(v["params"]["embed_y"]["embedding"], np.float64)
  expect = np.sum((e[np.asarray(y)] - e[np.asarray(y2)]) * np.asarray(phi, np.float64), axis=-1)
  np.testing.assert_allclose(np.asarray(l1) - np.asarray(l2), expect, rtol=1e-5, atol=1e-5)
  assert expect[2] == 0 and np.abs(expect[:2]).min() > 1e-3
  # The unconditional head: Dense(1) alone.
  U = _discriminator(shape, name, **{"model.class_conditional": False})
  assert "embed_y" not in jax.eval_shape(U.init, jax.random.key(0), x, y)["params"]


def test_adain():
  """AdaIN = y_s (x − μ)/σ + y_b, and the output's per-channel mean / std are y_b / |y_s|;
  a fresh AdaIN is instance norm."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3)) * 3 + 2
  w = jax.random.normal(jax.random.key(1), (2, 5))
  ada = gan.AdaIN()
  v = _random_variables(ada, x, w)
  out = np.asarray(jax.jit(ada.apply)(v, x, w), np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  wn = np.asarray(w, np.float64)
  ys = 1 + wn @ p["scale"]["kernel"] + p["scale"]["bias"]
  yb = wn @ p["shift"]["kernel"] + p["shift"]["bias"]
  xn = np.asarray(x, np.float64)
  mu, var = xn.mean(axis=(1, 2), keepdims=True), xn.var(axis=(1, 2), keepdims=True)
  expect = ys[:, None, None] * (xn - mu) / np.sqrt(var + 1e-5) + yb[:, None, None]
  np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.mean(axis=(1, 2)), yb, atol=1e-5)
  np.testing.assert_allclose(out.std(axis=(1, 2)), np.abs(ys), rtol=1e-4)
  fresh = jax.jit(ada.init)(jax.random.key(0), x, w)
  np.testing.assert_allclose(jax.jit(ada.apply)(fresh, x, w), (xn - mu) / np.sqrt(var + 1e-5),
                             rtol=1e-5, atol=1e-5)


def test_stylegan_noise():
  shape = (8, 8, 1)
  B = 4
  z, y, _, keys = _inputs(shape, B=B)
  G = _generator(shape, "stylegan")
  v = _random_variables(G, z, y)
  apply = _g_apply(G)
  a, b = apply(v, z, y, None), apply(v, z, y, None)
  np.testing.assert_array_equal(a, b)
  with_keys = apply(v, z, y, keys)
  other = apply(v, z, y, jax.random.split(jax.random.key(9), B))
  assert np.all(np.abs(with_keys - a).max(axis=(1, 2, 3)) > 1e-4)
  assert np.all(np.abs(with_keys - other).max(axis=(1, 2, 3)) > 1e-4)
  # Zero noise scales (as initialised): the keys change nothing.
  v0 = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.zeros_like(a) if "noise_" in jax.tree_util.keystr(p) else a, v)
  np.testing.assert_allclose(apply(v0, z, y, keys), apply(v0, z, y, None), atol=1e-6)
  # Example i depends only on (z_i, y_i, keys[i]): the batch of 4 vs example 2 alone.
  alone = apply(v, z[2:3], y[2:3], keys[2:3])
  np.testing.assert_allclose(alone[0], with_keys[2], rtol=1e-5, atol=1e-5)


def test_patchgan_receptive_field():
  """The gradient of one central logit w.r.t. the input is nonzero on exactly a 70×70
  window (patch_layers = 3)."""
  shape = (128, 128, 1)
  P = _discriminator(shape, "patchgan", channels=4, patch_layers=3,
                     **{"model.class_conditional": False})
  x = jax.random.normal(jax.random.key(0), (1,) + shape)
  y = jnp.zeros((1,), jnp.int32)
  v = _random_variables(P, x, y)
  assert gan.patch_shape(shape, 3) == (14, 14)

  @jax.jit
  def grad_and_shape(v, x):
    out = P.apply(v, x, y)
    return jax.grad(lambda x: P.apply(v, x, y)[0, 7, 7])(x), out
  g, out = grad_and_shape(v, x)
  assert out.shape == (1, 14, 14)
  nz = np.asarray(g[0, ..., 0]) != 0
  rows, cols = np.nonzero(nz.any(axis=1))[0], np.nonzero(nz.any(axis=0))[0]
  assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70
  assert nz[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # the whole window
  assert (rows.min(), cols.min()) == (7 * 8 - 23, 7 * 8 - 23)  # stride 8, padding 23


def test_errors():
  with pytest.raises(ValueError, match=r"config\.gan\.generator='dcgan'.*\(7, 7, 1\)"):
    _generator((7, 7, 1), "dcgan")
  with pytest.raises(ValueError, match=r"config\.gan\.generator='stylegan'.*\(7, 7, 1\)"):
    _generator((7, 7, 1), "stylegan")
  with pytest.raises(ValueError, match=r"config\.gan\.discriminator='dcgan'.*\(4, 4, 1\)"):
    _discriminator((4, 4, 1), "dcgan")  # 4/2 = 2 < 3
  with pytest.raises(ValueError, match=r"config\.gan\.discriminator='patchgan'.*conditional"):
    _discriminator((32, 32, 3), "patchgan")
  with pytest.raises(ValueError, match=r"config\.gan\.patch_layers=3.*\(8, 8, 1\)"):
    _discriminator((8, 8, 1), "patchgan", **{"model.class_conditional": False})
  # Unconditional patchgan and the mlp pair work for any shape; class_conditional False
  # means num_classes 0 (no label parameters).
  assert isinstance(_discriminator((7, 7, 1), "mlp"), nn.Module)
  G = _generator((7, 5, 3), "mlp", **{"model.class_conditional": False})
  assert G.num_classes == 0
  shapes = ((8, 8), (28, 28), (32, 32), (64, 64), (6, 12))
  assert [gan.upsampling_levels(s, "k", "v") for s in shapes] == [1, 2, 3, 4, 1]
