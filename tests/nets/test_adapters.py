"""LoRA and extra embedding rows through flax.linen.intercept_methods (nets/adapters.py)
on the project's own networks: the U-Net (class-conditional, with attention), DiT
(cross-attention to text) and the CLIP text encoder.

The truth is LoRA's own algebra (Hu et al. 2021, eq. 3): h = W x + f·B A x with ΔW =
A B of W's shape, so B = 0 or f = 0 is exactly the base network, and the adapted layer
equals the layer with kernel W + f·ΔW (merged); several adapters add their low-rank
terms. Textual inversion's extra rows (Gal et al. 2022, §3) are checked against the
same encoder with the rows appended to its table by hand. Every network is applied
under jax.jit (eager flax dispatches op by op); parameters are random, so the
zero-initialised output layers hide nothing.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import nets
from diffusion_jax.config import base
from diffusion_jax.data import text as text_lib
from diffusion_jax.nets import adapters, clip as clip_net, dit


def _random_params(net, *args, seed=0, **kw):
  """Random parameters of net's shapes without compiling its initialiser (numpy): norm
  scales 1 + 0.1·N, everything else 0.1·N (also the zero-initialised layers)."""
  shapes = jax.eval_shape(net.init, jax.random.key(0), *args, **kw)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(jax.tree_util.keystr(path).endswith("['scale']")
                                  + 0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _random_adapters(targets, rank, seed, scale=0.3):
  """Adapters with A and B both random (numpy): a visible, nonzero ΔW everywhere."""
  rng = np.random.default_rng(seed)
  layers = {}
  for path, (shape, n_in) in sorted(targets.items()):
    a = rng.standard_normal(tuple(shape[:n_in]) + (rank,)) / rank
    b = scale * rng.standard_normal((rank,) + tuple(shape[n_in:]))
    layers[path] = {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
  return adapters.nested(layers)


# One jitted function per (network, method, dropout): compiled once, shared by the tests.
@functools.cache
def _base(net, method=None):
  return jax.jit(lambda v, inputs: net.apply(v, **inputs, method=method))


@functools.cache
def _adapted(net, method=None, dropout=0.0):
  def f(v, ad, factor, inputs, key=None):
    with adapters.lora(ad, factor, dropout):
      return net.apply(v, **inputs, method=method,
                       rngs=None if key is None else {"dropout": key})
  return jax.jit(f)


def _first(out):
  """The array a network's output starts with (CLIP's encode_text returns a tuple)."""
  return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------------------- networks

X = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
T, Y = jnp.array([0.3, 0.7]), jnp.array([1, 10])  # 10 = the null class
UNET_TARGETS = ("qkv$", "/out$", r"ResBlock_\d+/Conv_0$", "^Dense_0$", "ResBlock_1/Dense_1$")


def _unet_config(**kw):
  c = base().model
  c.update(dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                num_heads=2, **kw))
  return c


@functools.cache
def _unet_setup():
  net = nets.build_denoiser(_unet_config(), 1, 10)
  inputs = dict(x=X, t=T, labels=Y)
  v = _random_params(net, X, T, Y)
  return net, None, v, inputs, UNET_TARGETS


@functools.cache
def _dit_setup():
  net = dit.DiT(out_channels=3, hidden_size=32, depth=2, num_heads=4, patch_size=2,
                num_classes=10)
  k = jax.random.split(jax.random.key(1), 3)
  inputs = dict(x=jax.random.normal(k[0], (2, 8, 8, 3)), t=jax.random.uniform(k[1], (2,)),
                labels=jnp.array([3, 10]), text=jax.random.normal(k[2], (2, 5, 12)),
                text_mask=jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool))
  v = _random_params(net, **inputs, seed=1)
  return net, None, v, inputs, (r"attn/(qkv|proj)$", r"cross_attn/(q|kv|proj)$", "mlp/fc1$",
                                "x_embedder$")


L = 16


def _clip_config():
  c = base()
  c.task = "clip"
  c.text.max_length = L
  c.clip.update(dict(embed_dim=12, text_width=16, text_depth=2, text_heads=2,
                     vision_width=16, vision_depth=1, vision_heads=2, patch_size=2))
  return c


@functools.cache
def _clip_setup():
  config = _clip_config()
  net = clip_net.from_config(config)
  tokens = jnp.asarray(text_lib.encode(["a handwritten 7", "the number two"], L))
  v = _random_params(net, jnp.zeros((2, 8, 8, 1)), tokens, seed=2)
  return net, "encode_text", v, dict(tokens=tokens), (r"^text/blocks_\d+/attn/(qkv|proj)$",
                                                      "^text/blocks_1/mlp/fc2$")


SETUPS = {"unet": _unet_setup, "dit": _dit_setup, "clip_text": _clip_setup}


def _targets(net, method, v, inputs, patterns):
  return adapters.lora_targets(lambda: net.apply(v, **inputs, method=method), v["params"],
                               patterns)


# ---------------------------------------------------------------------- single layers

def _wrap(layer):
  """The layer inside a network, at module path 'layers_0'."""
  return nn.Sequential([layer])


def _layer_cases():
  """(layer, input, einsum of x with A, einsum of (x A) with B) for the three kinds."""
  rng = np.random.default_rng(3)
  x3 = jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32)
  x4 = jnp.asarray(rng.standard_normal((2, 5, 3, 4)), jnp.float32)
  return {
      "dense": (_wrap(nn.Dense(7)), x3, "bni,ir->bnr", "bnr,ro->bno"),
      "dense_general_qkv": (_wrap(nn.DenseGeneral((3, 2, 4))), x3, "bni,ir->bnr",
                            "bnr,rthd->bnthd"),
      "dense_general_out": (_wrap(nn.DenseGeneral(6, axis=(-2, -1))), x4, "bnhd,hdr->bnr",
                            "bnr,ro->bno"),
  }


@pytest.mark.parametrize("kind", ["dense", "dense_general_qkv", "dense_general_out"])
def test_dense_layers_add_f_times_x_a_b(kind):
  layer, x, down, up = _layer_cases()[kind]
  v = _random_params(layer, x, seed=4)
  targets = adapters.lora_targets(lambda: layer.apply(v, x), v["params"], (".",))
  (path, _), = targets.items()
  assert path == "layers_0"
  ad = _random_adapters(targets, rank=3, seed=5)
  layer_ad = adapters.by_layer(ad)[path]
  f = 0.7
  got = jax.jit(lambda v, ad, x: _adapted_layer(layer, v, ad, f, x))(v, ad, x)
  base_out = jax.jit(layer.apply)(v, x)
  a, b = np.asarray(layer_ad["a"], np.float64), np.asarray(layer_ad["b"], np.float64)
  want = np.asarray(base_out, np.float64) + f * np.einsum(
      up, np.einsum(down, np.asarray(x, np.float64), a), b)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Merged: the same layer with kernel W + f·A B.
  merged = adapters.lora_merge(v["params"], ad, f)
  np.testing.assert_allclose(jax.jit(layer.apply)({"params": merged}, x), want,
                             rtol=1e-5, atol=1e-5)


def _adapted_layer(layer, v, ad, f, x):
  with adapters.lora(ad, f):
    return layer.apply(v, x)


@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), "VALID")])
def test_conv_adapter_is_the_merged_convolution(strides, padding):
  """A Conv's A is a kh×kw convolution to r channels (the layer's own strides and
  padding), B a 1×1 one; together the convolution with kernel W + f·ΔW (linear in the
  kernel)."""
  conv = _wrap(nn.Conv(5, (3, 3), strides=strides, padding=padding))
  x = jax.random.normal(jax.random.key(6), (2, 9, 9, 4))
  v = _random_params(conv, x, seed=6)
  targets = adapters.lora_targets(lambda: conv.apply(v, x), v["params"], (".",))
  assert targets == {"layers_0": ((3, 3, 4, 5), 3)}
  ad = _random_adapters(targets, rank=2, seed=7)
  got = jax.jit(lambda v, ad, x: _adapted_layer(conv, v, ad, 0.5, x))(v, ad, x)
  base_out = jax.jit(conv.apply)(v, x)
  merged = jax.jit(conv.apply)({"params": adapters.lora_merge(v["params"], ad, 0.5)}, x)
  np.testing.assert_allclose(got, merged, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(got - base_out)) > 1e-2


def test_compose_adds_the_low_rank_terms_of_one_layer():
  layer, x, _, _ = _layer_cases()["dense_general_qkv"]
  v = _random_params(layer, x, seed=8)
  targets = adapters.lora_targets(lambda: layer.apply(v, x), v["params"], (".",))
  ad1, ad2 = _random_adapters(targets, 2, seed=9), _random_adapters(targets, 3, seed=10)
  w1, w2 = 0.6, -1.3
  apply = jax.jit(lambda v, ad, f, x: _adapted_layer(layer, v, ad, f, x))
  base_out = np.asarray(jax.jit(layer.apply)(v, x), np.float64)
  one = np.asarray(apply(v, ad1, w1, x), np.float64) - base_out
  two = np.asarray(apply(v, ad2, w2, x), np.float64) - base_out
  both = np.asarray(apply(v, adapters.lora_compose([(ad1, w1), (ad2, w2)]), 1.0, x))
  np.testing.assert_allclose(both, base_out + one + two, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ whole networks

@pytest.mark.parametrize("name", list(SETUPS))
def test_fresh_or_unscaled_adapters_are_the_base_and_merged_equals_unmerged(name):
  net, method, v, inputs, patterns = SETUPS[name]()
  targets = _targets(net, method, v, inputs, patterns)
  # Dense / DenseGeneral [C, 3, h, d] (1 input axis), DenseGeneral [h, d, C] (2) and,
  # but in the text encoder, Conv (3).
  n_in = {n for _, n in targets.values()}
  assert n_in == ({1, 2} if name == "clip_text" else {1, 2, 3}), targets
  base_out = _base(net, method)(v, inputs)
  adapted = _adapted(net, method)
  fresh = adapters.lora_init(targets, rank=4, key=jax.random.key(3))
  assert all(np.all(np.asarray(ab["b"]) == 0) for ab in adapters.by_layer(fresh).values())
  assert all(np.any(np.asarray(ab["a"]) != 0) for ab in adapters.by_layer(fresh).values())
  # B = 0: exactly the base network, whatever the factor.
  jax.tree.map(np.testing.assert_array_equal, adapted(v, fresh, jnp.float32(2.0), inputs),
               base_out)
  ad = _random_adapters(targets, rank=4, seed=11)
  # Factor 0 with random A, B: exactly the base network.
  jax.tree.map(np.testing.assert_array_equal, adapted(v, ad, jnp.float32(0.0), inputs),
               base_out)
  # Merged (one set of weights) == unmerged (the low-rank path beside each layer), and
  # both visibly away from the base.
  f = jnp.float32(0.8)
  unmerged = adapted(v, ad, f, inputs)
  merged = _base(net, method)({"params": adapters.lora_merge(v["params"], ad, f)}, inputs)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               unmerged, merged)
  diff = np.max(np.abs(np.asarray(_first(unmerged)) - np.asarray(_first(base_out))))
  scale = np.max(np.abs(np.asarray(_first(base_out))))
  assert diff > 0.05 * scale, (diff, scale)


def test_unet_targets_cover_conv_dense_and_dense_general():
  net, method, v, inputs, patterns = _unet_setup()
  targets = _targets(net, method, v, inputs, patterns)
  assert targets["SelfAttention2D_0/qkv"] == ((32, 3, 2, 16), 1)   # [C, 3, heads, d]
  assert targets["SelfAttention2D_0/out"] == ((2, 16, 32), 2)      # [heads, d, C]
  assert targets["ResBlock_0/Conv_0"] == ((3, 3, 16, 16), 3)       # [kh, kw, i, o]
  assert targets["Dense_0"] == ((64, 64), 1)
  assert targets["ResBlock_1/Dense_1"] == ((16, 32), 1)            # a skip projection
  fresh = adapters.by_layer(adapters.lora_init(targets, rank=3, key=jax.random.key(0)))
  assert fresh["SelfAttention2D_0/qkv"]["a"].shape == (32, 3)
  assert fresh["SelfAttention2D_0/qkv"]["b"].shape == (3, 3, 2, 16)
  assert fresh["SelfAttention2D_0/out"]["a"].shape == (2, 16, 3)
  assert fresh["SelfAttention2D_0/out"]["b"].shape == (3, 32)
  assert fresh["ResBlock_0/Conv_0"]["a"].shape == (3, 3, 16, 3)
  assert fresh["ResBlock_0/Conv_0"]["b"].shape == (3, 16)
  # A ~ N(0, 1/r²).
  a = np.concatenate([np.ravel(ab["a"]) for ab in fresh.values()])
  assert abs(np.std(a) - 1 / 3) < 0.02


def test_lora_targets_errors_name_the_unused_pattern_and_list_the_layers():
  net, method, v, inputs, _ = _unet_setup()
  with pytest.raises(ValueError, match=r"'nowhere/\\\\d'.*SelfAttention2D_0/qkv") as e:
    _targets(net, method, v, inputs, ("qkv$", r"nowhere/\d"))
  assert "'qkv$'" not in str(e.value).split("layers are")[0]
  assert "ResBlock_0/Conv_0" in str(e.value)
  with pytest.raises(ValueError, match="lora_targets"):
    _targets(net, method, v, inputs, ())
  with pytest.raises(ValueError, match="lora_rank"):
    adapters.lora_init({"Dense_0": ((4, 4), 1)}, rank=0, key=jax.random.key(0))


def test_lora_merge_errors_on_a_wrong_path_or_shape():
  net, method, v, inputs, _ = _unet_setup()
  targets = _targets(net, method, v, inputs, ("^Dense_0$",))
  ad = adapters.by_layer(_random_adapters(targets, 2, seed=0))
  with pytest.raises(ValueError, match="'Dense_9'.*no layer"):
    adapters.lora_merge(v["params"], adapters.nested({"Dense_9": ad["Dense_0"]}), 1.0)
  wrong = {"a": jnp.zeros((64, 2)), "b": jnp.zeros((2, 65))}
  with pytest.raises(ValueError, match=r"'Dense_0'.*\(64, 65\).*\(64, 64\)"):
    adapters.lora_merge(v["params"], adapters.nested({"Dense_0": wrong}), 1.0)


def test_compose_of_two_adapters_is_their_weighted_sum():
  """Σᵢ wᵢ·ΔWᵢ as one adapter of rank r₁ + r₂; a layer only the first adapts gets only
  its term. Compared on the merged weights and on the U-Net's output."""
  net, method, v, inputs, patterns = _unet_setup()
  targets = _targets(net, method, v, inputs, patterns)
  ad1 = _random_adapters(targets, 2, seed=12)
  only_attn = {p: s for p, s in targets.items() if "SelfAttention2D" in p}
  ad2 = _random_adapters(only_attn, 3, seed=13)
  w1, w2 = 0.5, -0.9
  composed = adapters.lora_compose([(ad1, w1), (ad2, w2)])
  layers = adapters.by_layer(composed)
  assert set(layers) == set(targets)
  assert layers["SelfAttention2D_0/qkv"]["a"].shape == (32, 5)
  assert layers["ResBlock_0/Conv_0"]["a"].shape == (3, 3, 16, 2)
  flat = lambda p: {k: np.asarray(x, np.float64) for k, x in
                    jax.tree_util.tree_flatten_with_path(p)[0]}
  # Merged weights: W + 1·ΔW_composed == W + w1·ΔW1 + w2·ΔW2 (computed in float64).
  one = adapters.lora_merge(v["params"], composed, 1.0)
  d1, d2 = adapters.by_layer(ad1), adapters.by_layer(ad2)
  want = jax.tree.map(lambda x: np.asarray(x, np.float64), v["params"])
  delta = lambda d: np.tensordot(np.asarray(d["a"], np.float64),
                                 np.asarray(d["b"], np.float64), 1)
  for path in targets:
    node = want
    for k in path.split("/"):
      node = node[k]
    node["kernel"] = node["kernel"] + w1 * delta(d1[path]) + (
        w2 * delta(d2[path]) if path in d2 else 0)
  got, ref = flat(one), flat(want)
  assert got.keys() == ref.keys()
  for k in got:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-6, err_msg=str(k))
  # Outputs: the composed adapter (factor 1) == the base merged with each in turn.
  twice = adapters.lora_merge(adapters.lora_merge(v["params"], ad1, w1), ad2, w2)
  np.testing.assert_allclose(_adapted(net)(v, composed, jnp.float32(1.0), inputs),
                             _base(net)({"params": twice}, inputs), rtol=2e-4, atol=2e-5)


def test_gradient_flows_to_the_adapters():
  """d/dB of a scalar of the output is nonzero at B = 0, d/dA exactly zero there (ΔW =
  A B: ∂/∂A = (∂/∂ΔW) Bᵀ); with B ≠ 0 both are nonzero. The base parameters are an
  argument the gradient is not taken of."""
  net, method, v, inputs, patterns = _unet_setup()
  targets = _targets(net, method, v, inputs, patterns)
  weights = jax.random.normal(jax.random.key(9), X.shape)

  def scalar(ad, v, f):
    with adapters.lora(ad, f):
      return jnp.sum(weights * net.apply(v, **inputs))

  grad = jax.jit(jax.grad(scalar))
  fresh = adapters.lora_init(targets, rank=2, key=jax.random.key(4))
  g = adapters.by_layer(grad(fresh, v, jnp.float32(1.0)))
  assert set(g) == set(targets)
  for path, ab in g.items():
    assert np.all(np.asarray(ab["a"]) == 0), path
    assert np.any(np.asarray(ab["b"]) != 0), path
  g = adapters.by_layer(grad(_random_adapters(targets, 2, seed=14), v, jnp.float32(1.0)))
  for path, ab in g.items():
    assert np.any(np.asarray(ab["a"]) != 0) and np.any(np.asarray(ab["b"]) != 0), path


def test_dropout_only_with_a_dropout_rng():
  net, method, v, inputs, patterns = _unet_setup()
  targets = _targets(net, method, v, inputs, patterns)
  ad = _random_adapters(targets, 2, seed=15)
  f = jnp.float32(1.0)
  plain = _adapted(net)(v, ad, f, inputs)
  dropped = _adapted(net, dropout=0.5)
  # Without rngs: deterministic, and no dropout at all.
  np.testing.assert_array_equal(dropped(v, ad, f, inputs), plain)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  y1, y2 = dropped(v, ad, f, inputs, k1), dropped(v, ad, f, inputs, k2)
  np.testing.assert_array_equal(dropped(v, ad, f, inputs, k1), y1)  # a key is a function
  assert np.max(np.abs(y1 - y2)) > 1e-3
  assert np.max(np.abs(y1 - plain)) > 1e-3
  # Dropout is on the adapters' input only: with B = 0 the keys change nothing.
  fresh = adapters.lora_init(targets, rank=2, key=jax.random.key(0))
  np.testing.assert_array_equal(dropped(v, fresh, f, inputs, k1), _base(net)(v, inputs))


def test_adapters_under_remat_equal_without():
  net, method, v, inputs, patterns = _unet_setup()
  rnet = nets.build_denoiser(_unet_config(remat="dots"), 1, 10)
  targets = _targets(net, method, v, inputs, patterns)
  assert _targets(rnet, method, v, inputs, patterns) == targets
  ad = _random_adapters(targets, 2, seed=16)
  f = jnp.float32(0.7)
  want = _adapted(net)(v, ad, f, inputs)
  got = _adapted(rnet)(v, ad, f, inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(got - _base(net)(v, inputs))) > 1e-2
  # And its gradient flows through the rematerialised blocks.
  def scalar(ad, net):
    with adapters.lora(ad, f):
      return jnp.sum(net.apply(v, **inputs) ** 2)
  g, gr = (adapters.by_layer(jax.jit(jax.grad(scalar), static_argnums=1)(ad, n))
           for n in (net, rnet))
  for path in g:
    np.testing.assert_allclose(gr[path]["b"], g[path]["b"], rtol=1e-4, atol=1e-5,
                               err_msg=path)


# -------------------------------------------------------------------- embedding rows

def test_embedding_rows_extend_a_table():
  embed = _wrap(nn.Embed(5, 3))
  ids = jnp.array([[0, 4, 5, 7], [6, 2, 1, 5]])
  v = _random_params(embed, jnp.zeros((2, 4), jnp.int32), seed=17)
  rows = jax.random.normal(jax.random.key(8), (3, 3))

  @jax.jit
  def with_rows(v, rows, ids):
    with adapters.embedding_rows({"layers_0": rows}):
      return embed.apply(v, ids)

  got = np.asarray(with_rows(v, rows, ids))
  table = np.asarray(v["params"]["layers_0"]["embedding"])
  inside = np.asarray(ids) < 5
  np.testing.assert_array_equal(got[inside], table[np.asarray(ids)[inside]])
  np.testing.assert_array_equal(got[~inside], np.asarray(rows)[np.asarray(ids)[~inside] - 5])


def test_clip_placeholder_rows_equal_an_appended_table():
  """The CLIP text encoder with placeholder ids V + j under `embedding_rows` gives the
  features of the same encoder whose token table has the rows appended (built by hand:
  a TextTransformer of vocabulary V + K)."""
  net, _, v, _, _ = _clip_setup()
  config = _clip_config()
  V, K = text_lib.VOCAB_SIZE, 2
  rows = 0.1 * jax.random.normal(jax.random.key(10), (K, config.clip.text_width))
  tokens = jnp.asarray(text_lib.encode(["a <v0> digit", "<v1> and <v0>", "plain text"], L))
  assert int(jnp.max(tokens)) == V + 1

  @jax.jit
  def encode(params, rows, tokens):
    with adapters.embedding_rows({"text/token_embedding": rows}):
      return clip_net.encode_text(config, params, tokens)

  features, mask, pooled = encode(v["params"], rows, tokens)
  c = config.clip
  ref_net = clip_net.TextTransformer(L, c.text_width, c.text_depth, c.text_heads,
                                     vocab_size=V + K)
  text_params = dict(v["params"]["text"])
  table = text_params["token_embedding"]["embedding"]
  text_params["token_embedding"] = {"embedding": jnp.concatenate([table, rows], axis=0)}
  ref_features, ref_mask, ref_pooled = jax.jit(ref_net.apply)({"params": text_params}, tokens)
  np.testing.assert_allclose(features, ref_features, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(mask, ref_mask)
  proj = ref_pooled @ v["params"]["text_projection"]["kernel"]
  np.testing.assert_allclose(pooled, proj / jnp.linalg.norm(proj, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  # The prompt without placeholders is the encoder's own, bitwise.
  # (The same batch shape: the placeholders replaced by an id of the table.)
  plain = jax.jit(lambda p, t: clip_net.encode_text(config, p, t))(
      v["params"], jnp.where(tokens < V, tokens, 5))
  np.testing.assert_array_equal(features[2], plain[0][2])
  np.testing.assert_array_equal(pooled[2], plain[2][2])
  # The placeholders change what they touch: the first prompt's features differ from
  # the same prompt with row 0 replaced (a constant shift of a row would not do: the
  # LayerNorms remove it).
  other = encode(v["params"], rows.at[0].set(rows[1]), tokens)[0]
  assert np.max(np.abs(other[0] - features[0])) > 1e-3
  np.testing.assert_array_equal(other[2], features[2])
