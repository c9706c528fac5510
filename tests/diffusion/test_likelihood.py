"""Likelihoods against closed forms: Bayes' rule for the posterior, Gaussian KL, the
8-bit decoder's normalisation, and Gaussian data with the exact denoiser, for which
the true NLL is known (PF-ODE ≈ true NLL; the bound ≥ it and tightens with T)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import likelihood, paths

FLOW = paths.Path("flow")
VP = paths.Path("vp_discrete", 1000, "linear")

# Gaussian data N(μ, Σ) in D = 3 with a full covariance (off-diagonal Jacobians, so
# Hutchinson's estimate is not trivially exact).
D = 3
_A = np.random.RandomState(0).randn(D, D) * 0.3
SIGMA = _A @ _A.T + 0.1 * np.eye(D)
MU = np.array([0.3, -0.2, 0.1])


def true_nll(x):
  """−log N(x; μ, Σ) per row, float64."""
  d = np.asarray(x, np.float64) - MU
  return (0.5 * np.einsum("bi,ij,bj->b", d, np.linalg.inv(SIGMA), d)
          + 0.5 * np.log(np.linalg.det(2 * np.pi * SIGMA)))


def sample_data(n, seed=1):
  return np.random.RandomState(seed).multivariate_normal(MU, SIGMA, size=n).astype(np.float32)


def exact_posterior(path, x_t, t):
  """E[x₀ | x_t] = μ + aΣ(a²Σ + b²I)⁻¹(x_t − aμ), E[z | x_t] = b(a²Σ + b²I)⁻¹(x_t − aμ);
  t scalar or [B]. The ε̂ form needs no division by b, so it is exact at t = 0."""
  a, b = path.ab(t)
  a = jnp.broadcast_to(a, x_t.shape[:1])
  b = jnp.broadcast_to(b, x_t.shape[:1])
  sig, mu = jnp.asarray(SIGMA, jnp.float32), jnp.asarray(MU, jnp.float32)

  def one(xt, a, b):
    r = jnp.linalg.solve(a ** 2 * sig + b ** 2 * jnp.eye(D), xt - a * mu)
    return mu + a * sig @ r, b * r
  return jax.vmap(one)(x_t, a, b)


# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path,t,s", [(FLOW, 0.6, 0.3), (FLOW, 1.0, 0.9), (FLOW, 0.05, 0.01),
                                      (VP, 0.5, 0.499), (VP, 0.2, 0.05), (VP, 1.0, 0.999)])
def test_posterior_is_bayes_rule(path, t, s):
  """q(x_s | x_t, x₀) ∝ q(x_s | x₀)·q(x_t | x_s), by quadrature on a fine 1-D grid."""
  x0, x_t = 0.7, -0.4
  a_t, b_t = (float(v) for v in path.ab(t))
  a_s, b_s = (float(v) for v in path.ab(s))
  a_ts = a_t / a_s
  var_ts = b_t ** 2 - a_ts ** 2 * b_s ** 2
  grid = np.linspace(a_s * x0 - 12 * b_s, a_s * x0 + 12 * b_s, 100_001)
  log_w = (-0.5 * (grid - a_s * x0) ** 2 / b_s ** 2
           - 0.5 * (x_t - a_ts * grid) ** 2 / var_ts)
  w = np.exp(log_w - log_w.max())
  w /= w.sum()
  mean_num = np.sum(w * grid)
  var_num = np.sum(w * (grid - mean_num) ** 2)
  mean, var = likelihood.posterior(path, jnp.full((1, 1), x0), jnp.full((1, 1), x_t), t, s)
  np.testing.assert_allclose(float(mean[0, 0]), mean_num, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(var[0, 0]), var_num, rtol=2e-3)


def test_posterior_is_ddpm_eq_6_7():
  """On the discrete VP grid, s = t − 1/T gives DDPM's μ̃_t and β̃_t (Ho et al. eq. 7)."""
  ab_tab = VP.alpha_bar_table()
  i = np.array([2, 10, 500, 1000])
  beta = 1 - ab_tab[i] / ab_tab[i - 1]
  x0 = jnp.full((4, 1), 0.5)
  x_t = jnp.full((4, 1), -1.0)
  mean, var = likelihood.posterior(VP, x0, x_t, i / 1000, (i - 1) / 1000)
  mean_ref = (np.sqrt(ab_tab[i - 1]) * beta / (1 - ab_tab[i]) * 0.5
              + np.sqrt(1 - beta) * (1 - ab_tab[i - 1]) / (1 - ab_tab[i]) * -1.0)
  var_ref = (1 - ab_tab[i - 1]) / (1 - ab_tab[i]) * beta
  np.testing.assert_allclose(mean[:, 0], mean_ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(var[:, 0], var_ref, rtol=2e-3)


def test_gaussian_kl_monte_carlo():
  """KL = E_{x~N1}[log N1(x) − log N2(x)], by 10⁶ samples; and KL(p‖p) = 0."""
  m1, v1, m2, v2 = 0.3, 0.5, -0.4, 2.0
  x = np.random.RandomState(0).normal(m1, np.sqrt(v1), 1_000_000)
  log_ratio = (likelihood.gaussian_log_prob(x, m1, v1) - likelihood.gaussian_log_prob(x, m2, v2))
  mc, se = float(np.mean(log_ratio)), float(np.std(log_ratio) / 1000)
  kl = float(likelihood.gaussian_kl(m1, v1, m2, v2))
  assert abs(kl - mc) < 4 * se
  np.testing.assert_allclose(kl, 0.5 * (math.log(v2 / v1) + (v1 + 0.49) / v2 - 1), rtol=1e-6)
  assert float(likelihood.gaussian_kl(m1, v1, m1, v1)) == 0.0


def test_prior_kl():
  x0 = jnp.asarray(sample_data(4))
  np.testing.assert_allclose(likelihood.prior_kl(FLOW, x0), 0.0, atol=1e-7)
  a1, b1 = (float(v) for v in VP.ab(1.0))
  ref = 0.5 * np.sum((a1 * np.asarray(x0)) ** 2 + b1 ** 2 - 1 - np.log(b1 ** 2), axis=1)
  np.testing.assert_allclose(likelihood.prior_kl(VP, x0), ref, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.37, -6.0), (0.99, -1.0),
                                            (-1.3, 0.5), (0.2, -9.0)])
def test_discretized_gaussian_sums_to_one(mean, log_scale):
  x = jnp.arange(256) / 127.5 - 1.0
  logp = likelihood.discretized_gaussian_log_likelihood(x, mean, log_scale)
  assert np.all(np.isfinite(logp))
  np.testing.assert_allclose(float(jnp.sum(jnp.exp(logp))), 1.0, atol=1e-4)


# ----------------------------------------------------------------------------------
# PF-ODE.


def _denoiser(path):
  return lambda x_t, t: exact_posterior(path, x_t, t)


def test_pf_ode_exact_divergence_is_true_nll():
  x = jnp.asarray(sample_data(16))
  f = jax.jit(lambda x: likelihood.pf_ode_nll(FLOW, _denoiser(FLOW), x, jax.random.key(0),
                                              num_steps=20, exact_divergence=True, eps=1e-5))
  np.testing.assert_allclose(f(x), true_nll(x), rtol=1e-2)
  # Heun too (second order; more steps).
  g = jax.jit(lambda x: likelihood.pf_ode_nll(FLOW, _denoiser(FLOW), x, jax.random.key(0),
                                              num_steps=50, exact_divergence=True, eps=1e-5,
                                              method="heun"))
  np.testing.assert_allclose(g(x), true_nll(x), rtol=1e-2)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_pf_ode_hutchinson_is_unbiased(probe):
  """Average over 512 probes of one point per example ≈ the exact NLL."""
  x = jnp.asarray(np.repeat(sample_data(2), 512, axis=0))
  nll = jax.jit(lambda x: likelihood.pf_ode_nll(
      FLOW, _denoiser(FLOW), x, jax.random.key(3), num_steps=20, eps=1e-5,
      probe=probe))(x).reshape(2, 512)
  est, se = np.mean(nll, axis=1), np.std(nll, axis=1) / np.sqrt(512)
  assert np.all(np.std(nll, axis=1) > 1e-3)  # the probe matters (off-diagonal Jacobian)
  ref = true_nll(np.asarray(x[::512]))
  assert np.all(np.abs(est - ref) < 4 * se + 0.01 * np.abs(ref)), (est, ref, se)


def test_bits_per_dim_dequantized():
  """bpd = (−log p(x̃) + D·log 128)/(D·ln 2) with x̃ the dequantised point."""
  x = jnp.round((jnp.clip(jnp.asarray(sample_data(8)), -1, 1) + 1) * 127.5) / 127.5 - 1
  key = jax.random.key(5)
  bpd = likelihood.bits_per_dim_dequantized(FLOW, _denoiser(FLOW), x, key, num_steps=20,
                                            exact_divergence=True, eps=1e-5)
  x_deq = likelihood.dequantize(jax.random.split(key)[0], x)
  np.testing.assert_array_equal(jnp.floor((x_deq + 1) * 128), jnp.round((x + 1) * 127.5))
  ref = (true_nll(x_deq) + D * math.log(128)) / (D * math.log(2))
  np.testing.assert_allclose(bpd, ref, rtol=1e-2)


# ----------------------------------------------------------------------------------
# The variational bound.


def _x0_fn(path):
  return lambda x_t, t: exact_posterior(path, x_t, t)[0]


def _bound(x, T, exact=True):
  out = jax.jit(lambda x: likelihood.vlb_terms(
      FLOW, _x0_fn(FLOW), x, jax.random.key(1), grid=likelihood.geometric_grid(T, 1e-3),
      exact=exact, decoder="gaussian"))(x)
  return {k: np.asarray(v) for k, v in out.items()}


def test_bound_is_above_true_nll_and_tightens_with_T():
  """E_data[−ELBO] ≥ E_data[−log p_data] (= cross-entropy ≥ entropy), and on a
  geometric grid the gap → 0 as T grows. The gap is measured per example against the
  same x (paired), which removes the data's own variance."""
  x = sample_data(1024)
  nll = true_nll(x)
  gaps = {}
  for T in (10, 100, 1000):
    out = _bound(jnp.asarray(x), T)
    np.testing.assert_allclose(out["prior"], 0.0, atol=1e-6)  # flow: q(x_1) = N(0, I)
    d = out["total"] - nll
    gaps[T] = (d.mean(), d.std() / math.sqrt(len(d)))
  (g10, _), (g100, s100), (g1000, s1000) = gaps[10], gaps[100], gaps[1000]
  assert g10 > g100 + 3 * s100 > g1000 + 3 * s1000, gaps
  assert g1000 > -3 * s1000, gaps
  assert g1000 < 0.3, gaps


def test_monte_carlo_bound_matches_exact_sum():
  x = jnp.asarray(sample_data(1024, seed=2))
  exact, mc = _bound(x, 100), _bound(x, 100, exact=False)
  np.testing.assert_allclose(mc["decoder"].mean(), exact["decoder"].mean(), atol=0.05)
  diff = mc["total"] - exact["total"]
  assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff))


def test_discrete_vp_bound_on_8bit_data():
  """The default use: 8-bit data, the discrete VP path's own T = 1000 steps, the
  discretised decoder. The bound on a probability is ≥ 0 nats."""
  x = jnp.round((jnp.clip(jnp.asarray(sample_data(8)), -1, 1) + 1) * 127.5) / 127.5 - 1
  out = jax.jit(lambda x: likelihood.vlb_terms(VP, _x0_fn(VP), x, jax.random.key(0)))(x)
  assert all(np.all(np.isfinite(v)) for v in out.values())
  assert np.all(out["total"] > 0)
  bpd = likelihood.bits_per_dim(out["total"], D)
  # A continuous-data denoiser pays ≈ log 127.5 nats/dim for locating x inside its
  # bin, so ≈ (true NLL + D·log 127.5)/(D·ln 2) ≈ 8–11 bits here.
  assert np.all((bpd > 0) & (bpd < 16))


def test_grid_validation():
  with pytest.raises(ValueError, match="num_steps is required"):
    likelihood.vlb_grid(FLOW)
  with pytest.raises(ValueError, match="exceeds"):
    likelihood.vlb_grid(VP, 2000)
  np.testing.assert_allclose(likelihood.vlb_grid(VP, 10), np.linspace(0, 1, 11), atol=1e-6)
