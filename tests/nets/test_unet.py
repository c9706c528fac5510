"""The U-Net: shapes, zero-initialised output, conditioning (class, text by
cross-attention), bf16 compute, remat, the ADM switches, and the DDPM CIFAR-10 size."""
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import nets
from diffusion_jax.config import base
from diffusion_jax.nets import Classifier, UNet, layers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _net(**kw):
  return UNet(**{**dict(out_channels=1, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attn_resolutions=(4,), num_heads=2, num_classes=10), **kw})


# Everything under jit: eager flax dispatches (and compiles) op by op, ~10x slower here.
# One jitted function per network, shared by the tests (same shapes: compiled once).
@functools.cache
def _init(net):
  return jax.jit(net.init)


@functools.cache
def _apply(net):
  return jax.jit(net.apply)


def _perturbed(params, seed=2):
  """All params + 0.05·N(0, 1) (in numpy: nothing to compile), so the zero-initialised
  output layers hide nothing."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.05 * rng.standard_normal(p.shape),
                                            p.dtype), params)


def _random_params(net, *args, **kw):
  """Random parameters of net's shapes without compiling its initialiser: norm scales
  1 + 0.1·N, everything else 0.1·N."""
  shapes = jax.eval_shape(net.init, jax.random.key(0), *args, **kw)
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray((jax.tree_util.keystr(path).endswith("['scale']"))
                                  + 0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _names(tree):
  return {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


X = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
T, Y = jnp.array([0.3, 0.7]), jnp.array([1, 10])  # 10 = the null class
# Text: 4 tokens of width 6; example 0 has 4 real tokens, example 1 has 2 (then padding).
TEXT = jax.random.normal(jax.random.key(5), (2, 4, 6))
MASK = jnp.array([[True] * 4, [True, True, False, False]])
POOLED = jax.random.normal(jax.random.key(6), (2, 5))


@functools.cache
def _fresh_params():
  """(params without text, params with text) of _net() as initialised. Flax draws each
  parameter from its module's path, so the text model's other parameters are the
  plain model's: one initialisation (with text) gives both."""
  tparams = _init(_net())(jax.random.key(1), X, T, Y, text=TEXT, text_mask=MASK,
                          text_pooled=POOLED)
  plain = jax.eval_shape(_net().init, jax.random.key(1), X, T, Y)
  return _subtree(tparams, plain), tparams


def _subtree(tree, like):
  return {k: _subtree(tree[k], v) for k, v in like.items()} if isinstance(like, dict) else tree


def test_fresh_model_outputs_zero_and_shapes():
  net = _net()
  params, tparams = _fresh_params()
  out = _apply(net)(params, X, T, Y)
  assert out.shape == X.shape and out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out))) == 0.0
  # with text, the cross-attention layers are zero-initialised too
  out = _apply(net)(tparams, X, T, Y, text=TEXT, text_mask=MASK, text_pooled=POOLED)
  assert float(jnp.max(jnp.abs(out))) == 0.0
  # text adds layers and leaves the others as they are: one cross-attention per
  # self-attention (the down, middle and up blocks at 4×4) and the pooled projection
  plain, with_text = _names(params), _names(tparams)
  assert all(with_text[k] == v for k, v in plain.items())
  extra = {k.split("'")[3] for k in set(with_text) - set(plain)}
  assert extra == {"text_pooled_proj"} | {f"CrossAttention2D_{i}" for i in range(4)}, extra


def test_time_and_class_condition_the_output():
  net = _net()
  params = _perturbed(_fresh_params()[0])
  f = lambda t, y: _apply(net)(params, X, jnp.full(2, t), jnp.full(2, y))
  assert not np.allclose(f(0.1, 3), f(0.9, 3))
  assert not np.allclose(f(0.5, 3), f(0.5, 10))  # 10 = the null class
  with pytest.raises(ValueError, match="labels"):
    jax.eval_shape(net.apply, params, X, T)


def test_bfloat16_compute_close_to_float32():
  params = _perturbed(_fresh_params()[0])
  ref = _apply(_net())(params, X, T, Y)
  out = _apply(_net(dtype=jnp.bfloat16))(params, X, T, Y)
  assert out.dtype == jnp.float32  # output cast back; params stay float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  # Measured: ‖bf16 − fp32‖ / ‖fp32‖ = 0.013 (bf16 has an 8-bit mantissa, ε = 2⁻⁸);
  # the bound leaves ~3× margin.
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 0.04, rel
  # model.param_dtype reaches every parameter (incl. the text layers)
  c = base()
  c.model.param_dtype = "bfloat16"
  shapes = jax.eval_shape(nets.build_denoiser(c.model, 1, 10).init, jax.random.key(0), X, T, Y,
                          text=TEXT, text_mask=MASK, text_pooled=POOLED)
  assert {s.dtype for s in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_cross_attention_conditions_on_real_tokens_only():
  net = _net()
  params = _perturbed(_fresh_params()[1])
  f = lambda text=TEXT, mask=MASK, pooled=POOLED: np.asarray(
      _apply(net)(params, X, T, Y, text=text, text_mask=mask, text_pooled=pooled))
  ref = f()
  # changing a real token changes that example (only)
  out = f(text=TEXT.at[:, 1].add(1.0))
  assert not np.allclose(out[0], ref[0]) and not np.allclose(out[1], ref[1])
  # padded tokens (mask False) are ignored whatever their values
  padded = TEXT.at[1, 2:].set(jax.random.normal(jax.random.key(9), (2, 6)) * 100)
  np.testing.assert_array_equal(f(text=padded), ref)
  # ... and the mask is what hides them
  assert not np.allclose(f(mask=MASK.at[1, 2].set(True))[1], ref[1])
  # the pooled text feature conditions through the embedding
  assert not np.allclose(f(pooled=POOLED + 1.0), ref)
  with pytest.raises(ValueError, match="text_mask"):
    jax.eval_shape(net.apply, params, X, T, Y, text=TEXT, text_mask=MASK[:, :3])


def test_remat_is_exact():
  """Per-block rematerialisation (ResBlocks with train static, self- and
  cross-attention): same parameter tree, outputs and gradients (dropout on, train).
  One level, attention in the middle block only: every kind of block, compiled fast."""
  small = dict(channel_mult=(1,), attn_resolutions=(), dropout=0.1)
  plain, remat = _net(**small), _net(remat="nothing", **small)
  args, kw = (X, T, Y), dict(text=TEXT, text_mask=MASK, text_pooled=POOLED)
  shapes = jax.eval_shape(plain.init, jax.random.key(0), *args, **kw)
  assert jax.tree.structure(shapes) == jax.tree.structure(
      jax.eval_shape(remat.init, jax.random.key(0), *args, **kw))
  assert _names(shapes) == _names(jax.eval_shape(remat.init, jax.random.key(0), *args, **kw))
  params = _random_params(plain, *args, **kw)

  def loss_and_grad(net):
    def loss(p):
      out = net.apply(p, *args, **kw, train=True, rngs={"dropout": jax.random.key(3)})
      return jnp.sum(out ** 2), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (l0, out0), g0 = loss_and_grad(plain)
  (l1, out1), g1 = loss_and_grad(remat)
  # Equal up to float32 rounding: the recomputation is fused differently (measured:
  # outputs |Δ| ≤ 2.2e-6 at max |out| ≈ 2.4; gradients |Δ| ≤ 8.4e-5 at max |g| ≈ 96, so
  # leaves are compared on the global scale — biases ahead of a GroupNorm have gradient
  # 0 analytically and rounding noise in fact). A different dropout mask moves the
  # output by ~1.4: the masks agree.
  assert float(jnp.max(jnp.abs(out0))) > 0
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale), g1, g0)
  with pytest.raises(ValueError, match="model.remat"):
    jax.eval_shape(_net(remat="bogus").init, jax.random.key(0), *args)


def test_adm_switches_build_and_run():
  """resblock_updown (residual down/up-sampling blocks instead of strided conv /
  nearest + conv), num_head_channels, additive embedding; wired from config.model."""
  c = base()
  c.model.update(dict(channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), num_head_channels=8, resblock_updown=True,
                      scale_shift_norm=False, dropout=0.1))
  net = nets.build_denoiser(c.model, out_channels=1, num_classes=0)
  assert (net.resblock_updown, net.num_head_channels, net.scale_shift_norm) == (True, 8, False)
  params = _random_params(net, X, T)
  names = _names(params)
  # 32 channels at 4×4 / 8 channels per head = 4 heads
  assert names["['params']['SelfAttention2D_0']['qkv']['kernel']"] == (32, 3, 4, 8)
  # 10 residual blocks = 2 + 1 (down level 0, then its down block) + 2 (middle)
  # + 3 (up level 1, then its up block) + 2; only the in/out convs outside them
  assert sum("['kernel']" in k and k.count("[") == 3 and "ResBlock" not in k and "Conv" in k
             for k in names) == 2
  assert {k.split("'")[3] for k in names if "ResBlock" in k} == {
      f"ResBlock_{i}" for i in range(10)}
  # the additive (DDPM) embedding projects to C, not 2C
  assert names["['params']['ResBlock_0']['Dense_0']['kernel']"] == (64, 16)
  out = jax.jit(lambda p: net.apply(p, X, T, train=True, rngs={"dropout": jax.random.key(1)}))(
      params)
  assert out.shape == X.shape and bool(jnp.all(jnp.isfinite(out)))
  assert float(jnp.std(out)) > 0
  # the classifier (the encoder) takes the same switches
  c.model.remat = "dots"
  logits = jax.eval_shape(lambda: nets.build_classifier(c.model, 10).init_with_output(
      jax.random.key(0), X, T))[0]
  assert logits.shape == (2, 10)
  with pytest.raises(ValueError, match="num_head_channels=12"):
    jax.eval_shape(_net(num_head_channels=12).init, jax.random.key(0), X, T, Y)
  c.model.attention_impl = "cudnn"
  with pytest.raises(ValueError, match="model.attention_impl"):
    nets.build_denoiser(c.model, out_channels=1, num_classes=0)


def _ddpm_cifar10_count():
  """DDPM's CIFAR-10 U-Net (Ho et al. 2020, diffusion_tf/models/unet.py), by hand:
  ch = 128, ch_mult (1, 2, 2, 2), 2 res blocks, attention at 16×16, 3 → 3 channels.
  Each res block: GN(in), conv3×3(in→out), temb Dense(512→out), GN(out),
  conv3×3(out→out), and a 1×1 'nin' shortcut when in ≠ out. Attention: GN + q, k, v,
  proj (C×C + C each). Skips concatenate on the way up."""
  conv = lambda i, o, k=3: k * k * i * o + o
  gn = lambda c: 2 * c
  rb = lambda i, o: (gn(i) + conv(i, o) + 512 * o + o + gn(o) + conv(o, o)
                     + (i * o + o if i != o else 0))
  attn = lambda c: gn(c) + 4 * (c * c + c)
  temb = (128 * 512 + 512) + (512 * 512 + 512)
  conv_in = conv(3, 128)
  down = (2 * rb(128, 128) + conv(128, 128)                                   # 32×32
          + rb(128, 256) + rb(256, 256) + 2 * attn(256) + conv(256, 256)      # 16×16
          + 2 * rb(256, 256) + conv(256, 256)                                 # 8×8
          + 2 * rb(256, 256))                                                 # 4×4
  mid = rb(256, 256) + attn(256) + rb(256, 256)
  # skips, popped last-first: 128 (conv_in), 128, 128, 128 (down) | 256, 256, 256 (down) |
  # 256, 256, 256 (down) | 256, 256
  up = (3 * rb(512, 256) + conv(256, 256)                                     # 4×4
        + 3 * rb(512, 256) + conv(256, 256)                                   # 8×8
        + 2 * rb(512, 256) + rb(384, 256) + 3 * attn(256) + conv(256, 256)   # 16×16
        + rb(384, 128) + 2 * rb(256, 128))                                    # 32×32
  out = gn(128) + conv(128, 3)
  return temb + conv_in + down + mid + up + out


def _config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_ddpm_cifar10_has_the_papers_35_7m_parameters():
  assert _ddpm_cifar10_count() == 35_746_307  # the official DDPM CIFAR-10 checkpoint's count
  c = _config("cifar10_ddpm")
  m = c.model
  assert (m.channels, tuple(m.channel_mult), m.num_res_blocks, tuple(m.attn_resolutions),
          m.dropout, m.scale_shift_norm, m.class_conditional) == (
              128, (1, 2, 2, 2), 2, (16,), 0.1, False, False)
  net = nets.build_denoiser(m, out_channels=3, num_classes=0)
  shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros(1))
  assert sum(s.size for s in jax.tree.leaves(shapes)) == 35_746_307


def test_adm_imagenet64_config_builds():
  """ADM's ImageNet-64 U-Net settings (Dhariwal & Nichol 2021): 192 ch,
  mult (1, 2, 3, 4), 3 res blocks, attention at 32, 16, 8 with 64-channel heads,
  BigGAN up/down, AdaGN; learned Σ (6 outputs), 1000 classes."""
  c = base()
  c.model.update(dict(channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                      attn_resolutions=(32, 16, 8), num_head_channels=64,
                      resblock_updown=True, scale_shift_norm=True, dropout=0.1,
                      dtype="bfloat16", remat="dots"))
  net = nets.build_denoiser(c.model, out_channels=6, num_classes=1000)
  x = jnp.zeros((1, 64, 64, 3))
  out, variables = jax.eval_shape(lambda: net.init_with_output(
      jax.random.key(0), x, jnp.zeros(1), jnp.zeros(1, jnp.int32)))
  assert out.shape == (1, 64, 64, 6) and out.dtype == jnp.float32
  assert 290e6 < sum(s.size for s in jax.tree.leaves(variables)) < 300e6  # ≈ 296M


def test_classifier_param_tree_unchanged_by_remat():
  kw = dict(num_classes=10, channels=16, channel_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), num_heads=2)
  a = jax.eval_shape(Classifier(**kw).init, jax.random.key(0), X, T)
  b = jax.eval_shape(Classifier(remat="dots", **kw).init, jax.random.key(0), X, T)
  assert _names(a) == _names(b)


def test_timestep_embedding_is_sinusoidal():
  t = jnp.array([0.0, 0.25])
  emb = layers.timestep_embedding(t, 8)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(250 * freqs), np.sin(250 * freqs)]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_guidance_input_adds_only_a_zero_initialised_w_embedding():
  """model.guidance_input (Meng et al. 2023 §4.1): w [B] embedded like t and added to
  the time embedding. The other parameters are those of the plain model (the same
  names, shapes and initial values: flax draws each from its module's path); the
  embedding's last layer is zero, so with the plain model's (perturbed) parameters the
  output is exactly the plain model's for every w; once it is not zero, w matters."""
  plain, guided = _net(), _net(guidance_input=True)
  params = _fresh_params()[0]
  gparams = _init(guided)(jax.random.key(1), X, T, Y, guidance=jnp.zeros(2))["params"]
  extra = set(gparams) - set(params["params"])
  assert extra == {"guidance_embedder"}
  assert _names(gparams["guidance_embedder"]) == {
      "['fc1']['kernel']": (16, 64), "['fc1']['bias']": (64,),
      "['fc2']['kernel']": (64, 64), "['fc2']['bias']": (64,)}
  for k in params["params"]:
    jax.tree.map(np.testing.assert_array_equal, params["params"][k], gparams[k])
  teacher = _perturbed(params)
  student = {"params": {**teacher["params"], "guidance_embedder": gparams["guidance_embedder"]}}
  ref = _apply(plain)(teacher, X, T, Y)
  for w in (0.0, 1.0, 3.7):
    np.testing.assert_array_equal(_apply(guided)(student, X, T, Y, guidance=jnp.full(2, w)), ref)
  moved = _perturbed(student, seed=3)
  f = lambda w: _apply(guided)(moved, X, T, Y, guidance=jnp.full(2, w))
  assert not np.allclose(f(0.0), f(2.0))
  with pytest.raises(ValueError, match="guidance_input=True"):
    jax.eval_shape(guided.apply, student, X, T, Y)
  with pytest.raises(ValueError, match="guidance_input=False"):
    jax.eval_shape(plain.apply, teacher, X, T, Y, guidance=jnp.zeros(2))


def test_build_denoiser_passes_guidance_input():
  c = base()
  assert not nets.build_denoiser(c.model, 1, 10).guidance_input
  c.model.guidance_input = True
  assert nets.build_denoiser(c.model, 1, 10).guidance_input
  c.model.name = "dit"
  c.model.update(hidden_size=32, depth=1, num_heads=2, patch_size=2)
  assert nets.build_denoiser(c.model, 1, 10).guidance_input
