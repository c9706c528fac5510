"""A 2-D Gaussian mixture with exact denoisers for every path, and a distance to it.

Data x ~ Σ_k w_k·N(μ_k, s_k²·I). For x_t = a·x + b·z the marginal is again a mixture,
p_t = Σ_k w_k·N(a·μ_k, v_k·I) with v_k = a²s_k² + b², and the posterior mean is the
responsibility-weighted mean of the per-component posteriors (Gaussian conditioning):

    E[x | x_t] = Σ_k r_k(x_t)·(μ_k + a·s_k²/v_k·(x_t − a·μ_k)),
    r_k ∝ w_k·N(x_t; a·μ_k, v_k·I)   (softmax of log-densities: logsumexp-stable),

equal to Tweedie's (x_t + b²·∇log p_t)/a where a > 0, and finite where a = 0.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import predictions

_ANGLES = np.arange(6) * 2 * np.pi / 6 + 0.3
MEANS = jnp.asarray(np.stack([np.cos(_ANGLES), np.sin(_ANGLES)], 1) * [0.8, 0.6], jnp.float32)
STDS = jnp.asarray([0.08, 0.15, 0.1, 0.2, 0.12, 0.06], jnp.float32)
WEIGHTS = jnp.asarray([0.3, 0.1, 0.2, 0.15, 0.15, 0.1], jnp.float32)


def posterior_mean(x_t, a, b):
  """E[x₀ | x_t] for x_t [B, 2], a, b [B] (see the module docstring)."""
  a, b = a[:, None, None], b[:, None, None]                 # [B, 1, 1]
  v = a ** 2 * STDS[None, :, None] ** 2 + b ** 2            # [B, K, 1]
  diff = x_t[:, None, :] - a * MEANS[None]                  # [B, K, 2]
  logp = (jnp.log(WEIGHTS)[None] - 0.5 * jnp.sum(diff ** 2, -1) / v[..., 0]
          - jnp.log(v[..., 0]))                             # d = 2: log det = 2·log √v
  r = jax.nn.softmax(logp, axis=-1)[..., None]              # [B, K, 1]
  return jnp.sum(r * (MEANS[None] + a * STDS[None, :, None] ** 2 / v * diff), axis=1)


def model_fn(path, prediction):
  """A 'network' model_fn(x_t, t [B], labels) giving the exact prediction of any type."""
  def fn(x_t, t, labels):
    del labels
    a, b = path.ab(t)
    x0 = posterior_mean(x_t, a, b)
    eps = (x_t - a[:, None] * x0) / b[:, None]
    c, d = (v[:, None] for v in predictions.coefficients(path, prediction, t))
    return c * x0 + d * eps
  return fn


def sample(key, n):
  """n exact samples [n, 2]."""
  kc, kz = jax.random.split(key)
  comp = jax.random.choice(kc, len(WEIGHTS), (n,), p=WEIGHTS)
  return MEANS[comp] + STDS[comp][:, None] * jax.random.normal(kz, (n, 2))


@functools.cache
def _reference(n_ref=100_000, n_proj=256):
  """Sorted projections of a large exact sample: [n_proj, n_ref], and the directions."""
  ang = np.pi * np.arange(n_proj) / n_proj
  dirs = np.stack([np.cos(ang), np.sin(ang)], 1)
  ref = np.asarray(sample(jax.random.key(12345), n_ref), np.float64)
  return np.sort(ref @ dirs.T, axis=0).T, dirs


def sliced_wasserstein(x):
  """Sliced 2-Wasserstein distance of samples x [n, 2] to the mixture: the RMS over 256
  evenly spaced directions of the 1-D W₂ between projected quantiles (the reference's
  quantiles at (i + ½)/n, from 100k exact samples). With n = 4000 exact samples it is
  about 0.01 (sampling noise)."""
  ref, dirs = _reference()
  proj = np.sort(np.asarray(x, np.float64) @ dirs.T, axis=0).T          # [P, n]
  n = proj.shape[1]
  q = (np.arange(n) + 0.5) / n
  idx = np.minimum((q * ref.shape[1]).astype(np.int64), ref.shape[1] - 1)
  return float(np.sqrt(np.mean((proj - ref[:, idx]) ** 2)))
