"""DiT against the paper (parameter counts, FLOPs), adaLN-Zero, and its switches: scan,
remat, bf16, text conditioning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.nets import dit

# Table 4 of Peebles & Xie (2023): forward Gflops (multiply-adds) at 256×256, i.e. a
# 32×32×4 latent. Parameters: DiT's official count (model.parameters(), which includes
# the fixed pos_embed buffer) for XL/2, and the paper's rounded figures (M).
PAPER_GFLOPS = {"S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56,
                "B/2": 23.01, "L/8": 5.01, "L/4": 19.70, "L/2": 80.71, "XL/8": 7.39,
                "XL/4": 29.05, "XL/2": 118.64}
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}
XL2_OFFICIAL_PARAMS = 675_129_632


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract(name):
  """(net, abstract params, abstract inputs) of the paper's class-conditional ImageNet
  256 model: 1000 classes (+ null), learned sigma (8 output channels)."""
  net = dit.DiT(out_channels=8, num_classes=1000, **dit.variant(name))
  args = (jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32),
          jax.ShapeDtypeStruct((1,), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
  return net, jax.eval_shape(net.init, jax.random.key(0), *args), args


# The /2 models by default; /4 and /8 (same code, other patch sizes) with -m slow.
@pytest.mark.parametrize("name", [n if n.endswith("/2") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PAPER_GFLOPS])
def test_parameters_and_flops_match_the_paper(name):
  net, params, args = _abstract(name)
  size = dit.variant(name)
  pos_embed = (32 // size["patch_size"]) ** 2 * size["hidden_size"]  # a buffer in DiT
  n = _count(params) + pos_embed
  # Table 1 gives one count per size; the patch size changes it by < 1M.
  assert abs(n / 1e6 - PAPER_PARAMS_M[name.split("/")[0]]) < 1.0
  if name == "XL/2":
    assert n == XL2_OFFICIAL_PARAMS
  # XLA counts 2 FLOPs per multiply-add plus the elementwise work (norms, GELU,
  # softmax), which the paper leaves out: measured 0.25–0.8 % above the table.
  flops = jax.jit(net.apply).lower(params, *args).cost_analysis()["flops"]
  assert flops / 2 / 1e9 == pytest.approx(PAPER_GFLOPS[name], rel=0.01)


def _tiny(**kw):
  kw = dict(out_channels=3, hidden_size=32, depth=3, num_heads=4, patch_size=2,
            num_classes=10) | kw
  return dit.DiT(**kw)


def _inputs(text=False, B=2):
  k = jax.random.split(jax.random.key(1), 4)
  x = jax.random.normal(k[0], (B, 8, 8, 3))
  t = jax.random.uniform(k[1], (B,))
  y = jnp.arange(B) % 11  # includes the null class 10 when B > 10
  out = dict(x=x, t=t, labels=y)
  if text:
    out["text"] = jax.random.normal(k[2], (B, 5, 12))
    out["text_mask"] = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]][:B], bool)
    out["text_pooled"] = jax.random.normal(k[3], (B, 7))
  return out


def _randomise(params, key=jax.random.key(7), scale=0.1):
  """Perturbs every parameter (also the zero-initialised ones) so outputs are not 0."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def _apply(net):
  @jax.jit
  def f(params, inputs):
    inputs = dict(inputs)
    return net.apply({"params": params}, inputs.pop("x"), inputs.pop("t"),
                     inputs.pop("labels"), **inputs)
  return f


def _init(net, inputs):
  inputs = dict(inputs)
  return jax.jit(lambda k: net.init(k, inputs.pop("x"), inputs.pop("t"), inputs.pop("labels"),
                                    **inputs))(jax.random.key(0))["params"]


@pytest.mark.parametrize("text_attention", [
    None, pytest.param("cross", marks=pytest.mark.slow), "joint"])
def test_fresh_model_outputs_exactly_zero(text_attention):
  """adaLN-Zero (zero-initialised modulation, so every residual branch is gated by 0)
  and the zero-initialised final layer."""
  net = _tiny(text_attention=text_attention or "cross")
  inputs = _inputs(text=text_attention is not None)
  params = _init(net, inputs)
  out = _apply(net)(params, inputs)
  assert out.shape == (2, 8, 8, 3) and float(jnp.max(jnp.abs(out))) == 0.0


@pytest.mark.parametrize("text_attention", ["cross", pytest.param("joint", marks=pytest.mark.slow)])
def test_scan_equals_unscanned(text_attention):
  inputs = _inputs(text=True)
  scanned = _tiny(scan=True, text_attention=text_attention)
  params = _randomise(_init(scanned, inputs))
  assert params["blocks"]["mlp"]["fc1"]["kernel"].shape == (3, 32, 128)  # stacked
  plain = _tiny(text_attention=text_attention)
  a = _apply(scanned)(params, inputs)
  b = _apply(plain)(dit.unscanned_params(params, 3), inputs)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.std(a)) > 0.1


@pytest.mark.parametrize("policy,scan", [("nothing", False),
                                         pytest.param("dots", True, marks=pytest.mark.slow)])
def test_remat_equals_no_remat(policy, scan):
  """Same parameters, outputs and gradients; only the backward pass's memory differs."""
  inputs = _inputs()
  plain, remat = _tiny(scan=scan), _tiny(scan=scan, remat=policy)
  params = _randomise(_init(plain, inputs))
  assert jax.tree.structure(params) == jax.tree.structure(_init(remat, inputs))

  def loss(net):
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(_apply(net)(p, inputs) ** 2)))
  (la, ga), (lb, gb) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_compute_is_close_to_fp32():
  inputs = _inputs(text=True)
  fp32 = _tiny()
  params = _randomise(_init(fp32, inputs))
  a = _apply(fp32)(params, inputs)
  b = _apply(_tiny(dtype=jnp.bfloat16))(params, inputs)
  assert b.dtype == jnp.float32  # outputs are float32 whatever the compute dtype
  rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
  assert rel < 2e-2, rel  # measured 4e-3 (bf16 has an 8-bit mantissa)


@pytest.mark.parametrize("text_attention", ["cross", "joint"])
def test_text_conditioning_sees_real_tokens_only(text_attention):
  net = _tiny(text_attention=text_attention)
  inputs = _inputs(text=True)
  params = _randomise(_init(net, inputs))
  f = _apply(net)
  out = f(params, inputs)
  padded = dict(inputs, text=inputs["text"].at[0, 3:].set(100.0))  # example 0's padding
  np.testing.assert_allclose(f(params, padded), out, rtol=1e-5, atol=1e-5)
  real = dict(inputs, text=inputs["text"].at[0, 1].add(1.0))
  assert float(jnp.max(jnp.abs(f(params, real)[0] - out[0]))) > 1e-3
  np.testing.assert_allclose(f(params, real)[1], out[1], rtol=1e-5, atol=1e-5)
  pooled = dict(inputs, text_pooled=inputs["text_pooled"] + 1.0)
  assert float(jnp.max(jnp.abs(f(params, pooled) - out))) > 1e-3


def test_null_class_and_unpatchify_layout():
  """11 label embeddings (10 classes + ∅); unpatchify puts channel (i·p + j)·C + c of
  a patch's output vector at pixel (i, j), channel c of that patch (DiT's
  'nhwpqc->nhpwqc'): checked through the final layer's bias."""
  net = _tiny()
  inputs = _inputs(B=12)
  params = _init(net, inputs)
  assert params["y_embedder"]["embedding"].shape == (11, 32)
  bias = jnp.arange(2 * 2 * 3, dtype=jnp.float32)
  params["final_linear"]["bias"] = bias
  out = np.asarray(_apply(net)(params, inputs))
  i, j, c = np.meshgrid(np.arange(8), np.arange(8), np.arange(3), indexing="ij")
  expected = ((i % 2) * 2 + (j % 2)) * 3 + c
  np.testing.assert_array_equal(out, np.broadcast_to(expected, out.shape))


def test_sincos_position_embedding_closed_form():
  e = dit.sincos_pos_embed_2d(8, 3, 4)  # h=3 rows, w=4 columns, dim 8
  assert e.shape == (12, 8)
  omega = 1.0 / 10000 ** (np.arange(2) / 2)
  row, col = 2, 3
  expected = np.concatenate([np.sin(row * omega), np.cos(row * omega),
                             np.sin(col * omega), np.cos(col * omega)])
  np.testing.assert_allclose(e[row * 4 + col], expected, rtol=1e-6)


def test_bad_variant_and_patch_are_named():
  with pytest.raises(ValueError, match="model.variant"):
    dit.variant("XXL/2")
  net = _tiny(patch_size=3)
  with pytest.raises(ValueError, match="patch_size=3"):
    _init(net, _inputs())


def test_guidance_input_adds_only_a_zero_initialised_w_embedding():
  """model.guidance_input: w [B] → sinusoid_256 → MLP (last layer zero) added to c. The
  other parameters are the plain DiT's (names and initial values); with them, the
  output is exactly the plain DiT's for every w until the embedding moves."""
  inputs = _inputs()
  plain, guided = _tiny(), _tiny(guidance_input=True)
  params = _init(plain, inputs)
  gparams = _init(guided, dict(inputs, guidance=jnp.zeros(2)))
  assert set(gparams) - set(params) == {"guidance_embedder"}
  assert jax.tree.map(jnp.shape, gparams["guidance_embedder"]) == {
      "fc1": {"kernel": (256, 32), "bias": (32,)}, "fc2": {"kernel": (32, 32), "bias": (32,)}}
  for k in params:
    jax.tree.map(np.testing.assert_array_equal, params[k], gparams[k])
  teacher = _randomise(params)
  student = {**teacher, "guidance_embedder": gparams["guidance_embedder"]}
  ref = _apply(plain)(teacher, inputs)
  for w in (0.0, 1.5, 4.0):
    np.testing.assert_array_equal(
        _apply(guided)(student, dict(inputs, guidance=jnp.full(2, w))), ref)
  moved = _randomise(student, jax.random.key(8))
  f = lambda w: _apply(guided)(moved, dict(inputs, guidance=jnp.full(2, w)))
  assert not np.allclose(f(0.0), f(2.0))
  with pytest.raises(ValueError, match="guidance_input=True"):
    _apply(guided)(student, inputs)
  with pytest.raises(ValueError, match="guidance_input=False"):
    _apply(plain)(teacher, dict(inputs, guidance=jnp.zeros(2)))
