"""Classifier-free guidance with exact conditional and unconditional denoisers.

Class y = component y of the mixture in `mixture.py`: p(x | y) = N(μ_y, s_y²·I) and
p(x) = Σ_k w_k·N(μ_k, s_k²·I), so both denoisers are exact. Guidance in the notes'
form (1 + w)·f(y) − w·f(∅) is, on scores, the γ-interpolation
γ·∇log p_t(x|y) + (1 − γ)·∇log p_t(x) with γ = 1 + w (the prediction conversions are
linear), i.e. sampling ∝ p(x|y)^γ·p(x)^{1−γ} at every t.
"""
import jax
import jax.numpy as jnp
import mixture
import numpy as np
import pytest

from diffusion_jax import samplers
from diffusion_jax.diffusion import paths, predictions

PATH, PREDICTION = paths.Path("flow"), "velocity"
NULL = len(mixture.WEIGHTS)


def conditional_model_fn(x_t, t, labels):
  """Exact prediction: label k < NULL → component k alone; NULL → the whole mixture."""
  a, b = PATH.ab(t)
  mu, s = mixture.MEANS[labels % NULL], mixture.STDS[labels % NULL][:, None]
  a_, b_ = a[:, None], b[:, None]
  x0_cond = mu + a_ * s ** 2 / (a_ ** 2 * s ** 2 + b_ ** 2) * (x_t - a_ * mu)
  x0 = jnp.where((labels == NULL)[:, None], mixture.posterior_mean(x_t, a, b), x0_cond)
  eps = (x_t - a_ * x0) / b_
  c, d = (v[:, None] for v in predictions.coefficients(PATH, PREDICTION, t))
  return c * x0 + d * eps


def _samples(label: int, w: float, n: int = 3000):
  model_fn = samplers.guidance.classifier_free(conditional_model_fn, w, NULL)
  labels = jnp.full((n,), label, jnp.int32)
  den = samplers.make_denoiser(model_fn, PATH, PREDICTION, labels)
  x1 = jax.random.normal(jax.random.key(0), (n, 2))
  keys = jax.random.split(jax.random.key(1), n)
  return np.asarray(jax.jit(lambda x, k: samplers.dpm_solver_2m(den, PATH, x, k, 40,
                                                                spacing="logsnr")[0])(x1, keys))


def _class_posterior(x, label):
  """Exact p(y = label | x) under the mixture."""
  d2 = jnp.sum((jnp.asarray(x)[:, None] - mixture.MEANS[None]) ** 2, -1)
  logp = jnp.log(mixture.WEIGHTS) - 0.5 * d2 / mixture.STDS ** 2 - 2 * jnp.log(mixture.STDS)
  return np.asarray(jax.nn.softmax(logp, -1)[:, label])


@pytest.mark.parametrize("label", [1, 3])
def test_w0_reproduces_the_conditional(label):
  x = _samples(label, 0.0)
  np.testing.assert_allclose(x.mean(0), mixture.MEANS[label], atol=0.02)
  np.testing.assert_allclose(x.std(0), [mixture.STDS[label]] * 2, rtol=0.08)


def test_guidance_sharpens_class_separation():
  label = 3  # the widest component, which overlaps its neighbours most
  stds, posts = [], []
  for w in (0.0, 1.0, 3.0):
    x = _samples(label, w)
    stds.append(float(x.std(0).mean()))
    posts.append(float(np.mean(np.log(_class_posterior(x, label) + 1e-12))))
  assert stds[0] > stds[1] > stds[2], stds
  assert posts[0] < posts[1] < posts[2], posts


def test_gamma_form_equals_one_plus_w_form():
  """γ·f(y) + (1 − γ)·f(∅) with γ = 1 + w is the wrapper's output."""
  x = jax.random.normal(jax.random.key(2), (8, 2))
  t = jnp.full((8,), 0.4)
  y = jnp.arange(8) % NULL
  gamma = 2.5
  ref = gamma * conditional_model_fn(x, t, y) + (1 - gamma) * conditional_model_fn(
      x, t, jnp.full_like(y, NULL))
  out = samplers.guidance.classifier_free(conditional_model_fn, gamma - 1, NULL)(x, t, y)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def exact_log_prob(labels):
  """log p(y | x_t, t) under the noised mixture: the exact noise-conditional classifier."""
  def fn(x_t, t):
    a, b = PATH.ab(t)
    v = a[:, None] ** 2 * mixture.STDS[None] ** 2 + b[:, None] ** 2          # [B, K]
    d2 = jnp.sum((x_t[:, None] - a[:, None, None] * mixture.MEANS[None]) ** 2, -1)
    logits = jnp.log(mixture.WEIGHTS) - 0.5 * d2 / v - jnp.log(v)         # d = 2
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], 1)[:, 0]
  return fn


def _unconditional_guided(labels, scale):
  den = samplers.make_denoiser(conditional_model_fn, PATH, PREDICTION, jnp.full_like(labels, NULL))
  return samplers.guidance.classifier(den, PATH, exact_log_prob(labels), scale)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_exact_classifier_guidance_at_scale_1_is_the_conditional_denoiser(t):
  x = jax.random.normal(jax.random.key(3), (12, 2))
  y = jnp.arange(12, dtype=jnp.int32) % NULL
  guided = _unconditional_guided(y, 1.0)(x, jnp.float32(t))
  cond = samplers.make_denoiser(conditional_model_fn, PATH, PREDICTION, y)(x, jnp.float32(t))
  for g, c in zip(guided, cond):
    np.testing.assert_allclose(g, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("label", [1, 3])
def test_exact_classifier_guidance_samples_the_conditional(label):
  n = 3000
  labels = jnp.full((n,), label, jnp.int32)
  den = _unconditional_guided(labels, 1.0)
  x1 = jax.random.normal(jax.random.key(0), (n, 2))
  keys = jax.random.split(jax.random.key(1), n)
  x = np.asarray(jax.jit(lambda x, k: samplers.dpm_solver_2m(den, PATH, x, k, 40,
                                                             spacing="logsnr")[0])(x1, keys))
  np.testing.assert_allclose(x.mean(0), mixture.MEANS[label], atol=0.02)
  np.testing.assert_allclose(x.std(0), [mixture.STDS[label]] * 2, rtol=0.08)


def test_classifier_guidance_scale_sharpens():
  """s > 1 samples ∝ p(x)·p(y|x)^s: more mass where the class posterior is high."""
  label, n = 3, 3000
  labels = jnp.full((n,), label, jnp.int32)
  x1 = jax.random.normal(jax.random.key(0), (n, 2))
  keys = jax.random.split(jax.random.key(1), n)
  posts = []
  for s in (1.0, 3.0):
    den = _unconditional_guided(labels, s)
    x = jax.jit(lambda x, k: samplers.dpm_solver_2m(den, PATH, x, k, 40, spacing="logsnr")[0])(
        x1, keys)
    posts.append(float(np.mean(np.log(_class_posterior(x, label) + 1e-12))))
  assert posts[0] < posts[1], posts
