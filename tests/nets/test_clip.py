"""The CLIP dual encoder and the contrastive losses (networks under jax.jit)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.config import base
from diffusion_jax.data import text
from diffusion_jax.losses import contrastive
from diffusion_jax.nets import clip as clip_net

L = 24


def _config(loss="clip"):
  c = base()
  c.task = "clip"
  c.text.max_length = L
  c.clip.loss = loss
  c.clip.update(dict(embed_dim=12, text_width=16, text_depth=2, text_heads=2,
                     vision_width=16, vision_depth=1, vision_heads=2, patch_size=2))
  return c


@pytest.fixture(scope="module")
def model():
  config = _config()
  images = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1), minval=-1, maxval=1)
  tokens = jnp.asarray(text.encode(["a handwritten 7", "the number two", "nine"], L))
  params = jax.jit(lambda k: clip_net.from_config(config).init(k, images, tokens))(
      jax.random.key(0))["params"]
  encode_text = jax.jit(lambda p, t: clip_net.encode_text(config, p, t))
  return config, params, images, tokens, encode_text


def test_shapes_and_temperature(model):
  config, params, images, tokens, encode_text = model
  img, txt, scale, bias = jax.jit(lambda p: clip_net.from_config(config).apply(
      {"params": p}, images, tokens))(params)
  assert img.shape == txt.shape == (3, 12)
  np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
  assert float(bias) == 0
  features, mask, pooled = encode_text(params, tokens)
  assert features.shape == (3, L, 16) and mask.shape == (3, L) and mask.dtype == bool
  np.testing.assert_array_equal(mask, tokens != 0)
  np.testing.assert_allclose(pooled, txt, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda p: clip_net.encode_image(config, p, images))(params),
                             img, rtol=1e-5, atol=1e-6)
  # CLIP's clip at 100: a large learned log-scale gives exactly 100.
  big = dict(params, logit_scale=jnp.float32(10.0))
  _, _, scale, _ = jax.jit(lambda p: clip_net.from_config(config).apply(
      {"params": p}, images, tokens))(big)
  assert float(scale) == 100.0
  sig = _config("siglip")
  p = jax.jit(lambda k: clip_net.from_config(sig).init(k, images, tokens))(jax.random.key(0))
  _, _, scale, bias = jax.jit(lambda p: clip_net.from_config(sig).apply(p, images, tokens))(p)
  np.testing.assert_allclose([scale, bias], [10.0, -10.0], rtol=1e-6)


def test_padding_does_not_change_the_text_embedding(model):
  config, params, _, tokens, encode_text = model
  n = int(np.max(np.sum(tokens != text.PAD, axis=1)))  # 16: the longest caption
  assert n < L
  f_long, _, p_long = encode_text(params, tokens)
  f_short, _, p_short = encode_text(params, tokens[:, :n])
  np.testing.assert_allclose(p_short, p_long, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f_short, f_long[:, :n], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="config.text.max_length"):
    encode_text(params, jnp.zeros((1, L + 1), jnp.int32))


def test_text_transformer_is_causal(model):
  config, params, _, tokens, encode_text = model
  j = 5
  changed = tokens.at[:, j].set(tokens[:, j] + 1)  # a byte, EOS or PAD: any change
  f0, _, _ = encode_text(params, tokens)
  f1, _, _ = encode_text(params, changed)
  np.testing.assert_allclose(f1[:, :j], f0[:, :j], rtol=1e-6, atol=1e-6)
  assert np.all(np.abs(np.asarray(f1[:, j:]) - np.asarray(f0[:, j:])).max(axis=(1, 2)) > 1e-3)


def _numpy_clip(img, txt, scale):
  logits = scale * img.astype(np.float64) @ txt.T.astype(np.float64)
  b = len(img)
  i2t = -np.mean([logits[i, i] - np.log(np.sum(np.exp(logits[i]))) for i in range(b)])
  t2i = -np.mean([logits[j, j] - np.log(np.sum(np.exp(logits[:, j]))) for j in range(b)])
  return (i2t + t2i) / 2


def _numpy_siglip(img, txt, scale, bias):
  b, total = len(img), 0.0
  for i in range(b):
    for j in range(b):
      z = 1.0 if i == j else -1.0
      s = scale * float(img[i].astype(np.float64) @ txt[j].astype(np.float64)) + bias
      total += np.log(1 / (1 + np.exp(-z * s)))
  return -total / b


def _random_unit(key, shape):
  x = jax.random.normal(key, shape)
  return np.asarray(x / jnp.linalg.norm(x, axis=-1, keepdims=True))


def test_losses_match_brute_force():
  img, txt = _random_unit(jax.random.key(0), (7, 5)), _random_unit(jax.random.key(1), (7, 5))
  clip = jax.jit(contrastive.clip_loss)
  siglip = jax.jit(contrastive.siglip_loss)
  for scale in (1.0, 14.3, 50.0):
    np.testing.assert_allclose(clip(img, txt, scale), _numpy_clip(img, txt, scale), rtol=1e-5)
    for bias in (0.0, -10.0, 3.0):
      np.testing.assert_allclose(siglip(img, txt, scale, bias),
                                 _numpy_siglip(img, txt, scale, bias), rtol=1e-5)
  # At init (τ = 1/0.07 … but embeddings equal for all pairs): log B.
  same = np.ones((4, 3)) / math.sqrt(3)
  np.testing.assert_allclose(clip(same, same, 14.3), math.log(4), rtol=1e-6)


def test_aligned_orthogonal_embeddings_loss_vanishes_with_temperature():
  e = np.eye(6, dtype=np.float32)
  scales = (1.0, 3.0, 10.0, 30.0, 100.0)
  clip = [float(contrastive.clip_loss(e, e, s)) for s in scales]
  # log(1 + 5 e^(−τ)): strictly decreasing until it underflows to 0.
  np.testing.assert_allclose(clip, np.log1p(5 * np.exp(-np.array(scales))), atol=1e-7)
  assert clip[0] > clip[1] > clip[2] > clip[3] >= clip[4] and clip[-1] < 1e-6
  # SigLIP: positives at τ + b, negatives at b; with b = −τ/2 both margins grow.
  sig = [float(contrastive.siglip_loss(e, e, s, -s / 2)) for s in scales]
  assert sig[0] > sig[1] > sig[2] > sig[3] >= sig[4] and sig[-1] < 1e-6


def test_retrieval_accuracy():
  sim = jnp.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.7]])
  labels = jnp.array([3, 3, 5])
  acc = {k: float(v) for k, v in contrastive.retrieval_accuracy(sim, labels).items()}
  # rows: image 1's best caption is 0 (same label); columns: every caption finds its image
  assert acc == pytest.approx({"i2t": 2 / 3, "t2i": 1.0, "i2t_class": 1.0, "t2i_class": 1.0})
  sim = sim.at[2, 1].set(0.9)  # caption 1 now retrieves image 2, of another label
  acc = {k: float(v) for k, v in contrastive.retrieval_accuracy(sim, labels).items()}
  assert acc["t2i"] == pytest.approx(2 / 3) and acc["t2i_class"] == pytest.approx(2 / 3)
