"""VAE losses against closed forms: the Gaussian KL (its formula and a Monte Carlo
estimate), the reparameterised gradient of E[f(z)] for a quadratic f, the decoder
log-probabilities against scipy, the discretised logistic's 256 masses summing to 1, and
the ELBO / IWAE of a linear-Gaussian model whose log p(x) is known."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import losses
from diffusion_jax.losses import vae as vae_losses

RNG = np.random.default_rng(0)


def test_kl_equals_its_closed_form_and_a_monte_carlo_estimate():
  mean = RNG.normal(size=(3, 2, 2)).astype(np.float32)  # a latent of any shape
  logvar = RNG.normal(scale=0.5, size=(3, 2, 2)).astype(np.float32)
  kl = np.asarray(vae_losses.kl_standard_normal(mean, logvar))
  std = np.exp(0.5 * logvar.astype(np.float64))
  # KL(N(μ, σ²) ‖ N(0, 1)) = −log σ + (σ² + μ²)/2 − 1/2 per dimension.
  closed = np.sum(-np.log(std) + (std ** 2 + mean.astype(np.float64) ** 2) / 2 - 0.5,
                  axis=(1, 2))
  np.testing.assert_allclose(kl, closed, rtol=1e-5)
  assert kl.shape == (3,) and np.all(kl > 0)
  np.testing.assert_allclose(vae_losses.kl_standard_normal(np.zeros((2, 4)), np.zeros((2, 4))),
                             0.0, atol=1e-7)

  @jax.jit
  def mc(key):
    keys = jax.random.split(key, 100_000)
    z = jax.vmap(lambda k: vae_losses.reparameterize(k, mean, jnp.asarray(std, jnp.float32)))(keys)
    # log q(z) − log p(z) per draw, [S, B]
    per = jax.vmap(lambda zz: vae_losses.gaussian_log_prob(zz, mean, 0.5 * logvar)
                   - vae_losses.standard_normal_log_prob(zz))(z)
    return jnp.mean(per, 0), jnp.std(per, 0) / math.sqrt(per.shape[0])

  estimate, stderr = map(np.asarray, mc(jax.random.key(1)))
  assert np.all(np.abs(estimate - kl) < 4 * stderr + 1e-4), (estimate, kl, stderr)


def test_reparameterised_gradient_equals_the_analytic_gradient():
  """f(z) = Σ a_j z_j² + b_j z_j: E[f] = Σ a(μ² + σ²) + bμ, so ∇_μ E f = 2aμ + b and
  ∇_σ E f = 2aσ. The pathwise Monte Carlo gradient (Kingma & Welling 2014, §2.4) agrees
  within its standard error; the per-draw gradients have the analytic mean."""
  a = jnp.array([1.5, -0.7, 0.3])
  b = jnp.array([0.2, 1.0, -2.0])
  mu = jnp.array([0.5, -1.0, 2.0])
  sigma = jnp.array([0.8, 1.3, 0.4])
  f = lambda z: jnp.sum(a * z ** 2 + b * z)
  n = 200_000
  keys = jax.random.split(jax.random.key(0), n)
  per = jax.jit(jax.vmap(jax.grad(lambda m, s, k: f(vae_losses.reparameterize(k, m, s)),
                                  argnums=(0, 1)), in_axes=(None, None, 0)))(mu, sigma, keys)
  for g, want in zip(per, (2 * a * mu + b, 2 * a * sigma)):
    g = np.asarray(g, np.float64)
    err = np.abs(g.mean(0) - np.asarray(want))
    assert np.all(err < 4 * g.std(0) / math.sqrt(n) + 1e-6), (g.mean(0), want)
  # The noise is the key's alone: the same key, the same z for any (μ, σ).
  k = jax.random.key(5)
  e = vae_losses.reparameterize(k, jnp.zeros(3), jnp.ones(3))
  np.testing.assert_allclose(vae_losses.reparameterize(k, mu, sigma), mu + sigma * e, rtol=1e-6)


def test_gaussian_and_bernoulli_log_probs_match_scipy():
  x = RNG.normal(size=(4, 3, 2, 1))
  mean = RNG.normal(size=(4, 3, 2, 1))
  log_std = RNG.normal(scale=0.3, size=(4, 3, 2, 1))
  want = stats.norm(mean, np.exp(log_std)).logpdf(x).reshape(4, -1).sum(1)
  np.testing.assert_allclose(vae_losses.gaussian_log_prob(x, mean, log_std), want, rtol=1e-5)
  # A scalar log σ (a fixed decoder σ) broadcasts.
  want = stats.norm(mean, 0.1).logpdf(x).reshape(4, -1).sum(1)
  np.testing.assert_allclose(vae_losses.gaussian_log_prob(x, mean, np.log(0.1)), want, rtol=1e-5)
  np.testing.assert_allclose(vae_losses.standard_normal_log_prob(x),
                             stats.norm().logpdf(x).reshape(4, -1).sum(1), rtol=1e-5)

  x01 = RNG.integers(0, 2, size=(5, 7)).astype(np.float32)
  logits = RNG.normal(scale=3, size=(5, 7))
  want = stats.bernoulli(1 / (1 + np.exp(-logits))).logpmf(x01).sum(1)
  np.testing.assert_allclose(vae_losses.bernoulli_log_prob(x01, logits), want, rtol=1e-5)
  # Extreme logits stay finite (no probability is formed).
  extreme = vae_losses.bernoulli_log_prob(np.array([[1.0, 0.0]]), np.array([[-80.0, 80.0]]))
  np.testing.assert_allclose(extreme, [-160.0], rtol=1e-6)


def _logistic_log_reference(n, mean, scale):
  """float64 log-masses of the 8-bit values n under the discretised logistic, from
  scipy's log-CDF / log-survival function on the side of the mean the bin is on (no
  cancellation in either tail)."""
  n, mean, scale = np.broadcast_arrays(n, mean, scale)
  d = stats.logistic(mean, scale)
  x = n / 127.5 - 1
  hi, lo = x + 1 / 255, x - 1 / 255
  with np.errstate(divide="ignore"):
    left = d.logcdf(hi) + np.log1p(-np.exp(d.logcdf(lo) - d.logcdf(hi)))
    right = d.logsf(lo) + np.log1p(-np.exp(d.logsf(hi) - d.logsf(lo)))
  mid = np.where(x <= mean, left, right)
  return np.where(n == 0, d.logcdf(hi), np.where(n == 255, d.logsf(lo), mid))


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.37, -1.0), (-1.0, -6.5),
                                            (1.0, -5.0), (0.2, 2.0), (-3.0, 0.0)])
def test_discretized_logistic_sums_to_one_and_matches_scipy(mean, log_scale):
  """The 256 masses of one pixel sum to 1 (edges at −1 and 1 take the tails), and each
  equals the scipy logistic's CDF difference over its bin."""
  n = np.arange(256)
  x = (n / 127.5 - 1).astype(np.float32).reshape(256, 1)
  logp = np.asarray(vae_losses.discretized_logistic_log_prob(
      x, np.full_like(x, mean), np.full_like(x, log_scale)), np.float64)
  assert np.all(np.isfinite(logp))
  np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=2e-5)
  ref = _logistic_log_reference(n, mean, np.exp(log_scale))
  np.testing.assert_allclose(logp, ref, rtol=1e-4, atol=1e-4)


def test_discretized_logistic_sums_per_example_and_has_finite_gradients():
  x = (RNG.integers(0, 256, size=(3, 4, 4, 1)) / 127.5 - 1).astype(np.float32)
  x[0, 0, 0, 0], x[0, 0, 1, 0] = -1.0, 1.0  # both edges
  mean = RNG.normal(scale=0.5, size=x.shape).astype(np.float32)
  log_scale = RNG.normal(scale=2.0, size=x.shape).astype(np.float32) - 3
  logp = jax.jit(vae_losses.discretized_logistic_log_prob)
  got = logp(x, mean, log_scale)
  n = np.round((x + 1) * 127.5).astype(int)
  ref = _logistic_log_reference(n, mean.astype(np.float64),
                                np.exp(np.maximum(log_scale, vae_losses.MIN_LOG_SCALE)))
  np.testing.assert_allclose(got, ref.reshape(3, -1).sum(1), rtol=1e-4)
  grads = jax.jit(jax.grad(lambda m, s: jnp.sum(logp(x, m, s)), argnums=(0, 1)))(mean, log_scale)
  assert all(np.all(np.isfinite(g)) for g in grads)
  # Tiny scales are clamped at log s = −7 (PixelCNN++): a bin at its own location then
  # holds σ(4.3) − σ(−4.3) ≈ 0.973 of the mass, an edge value σ(4.3) ≈ 0.987.
  on_grid = np.array([[0.2, -1.0, 1.0]], np.float32)  # 8-bit values 153, 0, 255
  sharp = logp(on_grid, on_grid, np.full((1, 3), -20.0, np.float32))
  s = np.exp(-7.0) * 255
  want = np.log(1 / (1 + np.exp(-1 / s)) - 1 / (1 + np.exp(1 / s))) + 2 * np.log(
      1 / (1 + np.exp(-1 / s)))
  np.testing.assert_allclose(sharp, [want], rtol=1e-4)
  far = logp(np.array([[1.0]], np.float32), np.array([[-1.0]], np.float32),
             np.array([[-7.0]], np.float32))
  assert np.isfinite(far[0]) and float(far[0]) < -1000


def _linear_gaussian(x, std_factor, k, key, w, b, sigma):
  """log p(x|z), log p(z), log q(z|x) [k, B] of z ~ N(0, 1) (one latent), x | z ~
  N(wz + b, σ²I); q is the exact posterior with its std × std_factor. Also the exact
  log p(x) [B]."""
  D = w.shape[0]
  s2 = 1.0 / (1.0 + w @ w / sigma ** 2)          # posterior variance
  m = s2 * ((x - b) @ w) / sigma ** 2            # posterior mean [B]
  s = jnp.sqrt(s2) * std_factor
  z = m[None] + s * jax.random.normal(key, (k, x.shape[0]))
  log_px = jax.vmap(lambda zk: vae_losses.gaussian_log_prob(x, zk[:, None] * w + b,
                                                             math.log(sigma)))(z)
  log_pz = jax.vmap(lambda zk: vae_losses.standard_normal_log_prob(zk[:, None]))(z)
  log_qz = jax.vmap(lambda zk: vae_losses.gaussian_log_prob(zk[:, None], m[:, None],
                                                             jnp.log(s)))(z)
  cov = np.outer(w, w) + sigma ** 2 * np.eye(D)
  exact = stats.multivariate_normal(np.asarray(b), cov).logpdf(np.asarray(x))
  kl = vae_losses.kl_standard_normal(m[:, None], jnp.full((x.shape[0], 1), 2 * jnp.log(s)))
  return log_px, log_pz, log_qz, exact, kl


def test_elbo_and_iwae_of_a_linear_gaussian_model():
  """With the exact posterior every importance weight is p(x): ELBO = IWAE_K = log p(x)
  for every K. With a too-wide posterior (std × 2.5) the bounds are below log p(x), and
  the IWAE mean over 64 examples (200 replicates) increases with K towards it (Burda et al. 2016,
  Theorem 1), by margins far beyond their Monte Carlo error."""
  D, B = 6, 64
  w = jnp.asarray(RNG.normal(size=D), jnp.float32)
  b = jnp.asarray(RNG.normal(size=D), jnp.float32)
  sigma = 0.5
  x = jnp.asarray(np.asarray(b) + RNG.normal(size=(B, 1)) * np.asarray(w)
                  + sigma * RNG.normal(size=(B, D)), jnp.float32)
  log_px, log_pz, log_qz, exact, kl = _linear_gaussian(x, 1.0, 8, jax.random.key(0), w, b, sigma)
  np.testing.assert_allclose(vae_losses.iwae(log_px, log_pz, log_qz), exact, rtol=1e-5)
  np.testing.assert_allclose(vae_losses.iwae(log_px[:1], log_pz[:1], log_qz[:1]), exact, rtol=1e-5)
  # The closed-form-KL ELBO is log p(x) in expectation (the reconstruction term is a
  # sample average): within a few standard errors of its 8 draws.
  e = np.asarray(vae_losses.elbo(log_px, kl))
  assert abs(np.mean(e - exact)) < 0.05
  assert losses.vae is vae_losses

  # A wide posterior: the expected bounds, estimated with 200 independent replicates.
  reps = 200
  ks = (1, 4, 16, 64)

  @jax.jit
  def bounds(key):
    out = {}
    for i, k in enumerate(ks):
      lp, lz, lq, _, kl = _linear_gaussian(x, 2.5, k, jax.random.fold_in(key, i), w, b, sigma)
      out[f"k{k}"] = vae_losses.iwae(lp, lz, lq)
      if k == 16:
        out["elbo"] = vae_losses.elbo(lp, kl)
    return out

  runs = jax.vmap(bounds)(jax.random.split(jax.random.key(1), reps))
  mean = {k: float(jnp.mean(v)) - float(np.mean(exact)) for k, v in runs.items()}  # gaps
  err = {k: float(jnp.std(jnp.mean(v, 1))) / math.sqrt(reps) for k, v in runs.items()}
  assert abs(mean["k1"] - mean["elbo"]) < 4 * (err["k1"] + err["elbo"]), (mean, err)
  for lo, hi in zip(ks, ks[1:]):
    se = math.hypot(err[f"k{hi}"], err[f"k{lo}"])  # independent draws for each K
    assert mean[f"k{hi}"] - mean[f"k{lo}"] > 5 * se, (mean, err)
  # Below log p(x), by a lot at K = 1.
  assert mean["k64"] < 2 * err["k64"] and mean["k1"] < -1.0, mean
  print("\nlinear-Gaussian bound gaps (nats):", {k: round(v, 4) for k, v in mean.items()})
  with pytest.raises(ValueError, match=r"\[K, B\]"):
    vae_losses.iwae(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3))
