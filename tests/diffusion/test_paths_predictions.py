"""Paths, predictions and time sampling against closed forms."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import paths, predictions, time_sampling
from diffusion_jax.config import base

PATHS = [paths.Path("flow"), paths.Path("vp_discrete", 1000, "linear"),
         paths.Path("vp_discrete", 1000, "cosine"), paths.Path("vp_linear"),
         paths.Path("vp_cosine"), paths.Path("sub_vp"), paths.Path("ve"),
         paths.Path("edm", sigma_min=0.002, sigma_max=80.0)]


def test_flow_is_linear_interpolation():
  t = jnp.linspace(0, 1, 11)
  a, b = paths.Path("flow").ab(t)
  np.testing.assert_allclose(a, 1 - t)
  np.testing.assert_allclose(b, t)
  da, db = paths.Path("flow").ab_dot(t)
  np.testing.assert_allclose(da, -1.0)
  np.testing.assert_allclose(db, 1.0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_discrete_marginal_equals_sequential_forward_steps(schedule):
  """q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, 1 − ᾱ_t) equals T sequential steps
  x_i = sqrt(1 − β_i)·x_{i−1} + sqrt(β_i)·z_i (mean and variance recursions)."""
  T = 1000
  betas = paths.ddpm_betas(schedule, T)
  mean_coef, var = 1.0, 0.0
  path = paths.Path("vp_discrete", T, schedule)
  for i, beta in enumerate(betas, start=1):
    mean_coef = np.sqrt(1 - beta) * mean_coef
    var = (1 - beta) * var + beta
    if i in (1, 10, 500, 1000):
      a, b = path.ab(i / T)
      np.testing.assert_allclose(a, mean_coef, rtol=2e-4, atol=1e-6)
      np.testing.assert_allclose(b ** 2, var, rtol=2e-4)
  if schedule == "linear":
    np.testing.assert_allclose([betas[0], betas[-1]], [1e-4, 0.02])
  a0, b0 = path.ab(0.0)
  assert (float(a0), float(b0)) == (1.0, 0.0)


@pytest.mark.parametrize("path,prediction", list(itertools.product(PATHS, predictions.PREDICTIONS)))
def test_conversions_round_trip(path, prediction):
  """target(x, z) converted back gives exactly (x, z)."""
  kx, kz, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (6, 4, 4, 1))
  z = jax.random.normal(kz, (6, 4, 4, 1))
  t = jax.random.uniform(kt, (6,), minval=0.05, maxval=0.95)
  if path.discrete:
    t = path.snap(t)
  a, b = path.ab(t)
  x_t = a[:, None, None, None] * x + b[:, None, None, None] * z
  p = predictions.target(path, prediction, x, z, t)
  x_hat, z_hat = predictions.to_x0_eps(path, prediction, p, x_t, t)
  np.testing.assert_allclose(x_hat, x, atol=2e-4)
  np.testing.assert_allclose(z_hat, z, atol=2e-4)
  # velocity from (x̂₀, ε̂) is the time derivative of the path at fixed (x, z)
  da, db = path.ab_dot(t)
  v = predictions.velocity(path, x_hat, z_hat, t)
  np.testing.assert_allclose(v, da[:, None, None, None] * x + db[:, None, None, None] * z,
                             atol=2e-3)


def test_time_samplers():
  cfg = base().diffusion
  path = paths.Path("vp_discrete", 100)
  keys = jax.random.split(jax.random.key(0), 20000)
  for kind in ("uniform", "logit_normal", "discrete"):
    cfg.time_sampling = kind
    t = np.asarray(jax.vmap(lambda k: time_sampling.sample_t(cfg, path, k))(keys))
    assert t.min() >= 0 and t.max() <= 1
    if kind == "uniform":
      assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.005
    if kind == "logit_normal":  # logit(t) ~ N(0, 1)
      logit = np.log(t / (1 - t))
      assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
    if kind == "discrete":
      np.testing.assert_allclose(t * 100, np.round(t * 100), atol=1e-4)
      assert t.min() >= 0.01
  cfg.time_sampling, cfg.time_shift = "uniform", 3.0
  t = np.asarray(jax.vmap(lambda k: time_sampling.sample_t(cfg, path, k))(keys[:5000]))
  # shift k·t/(1+(k−1)t) moves mass towards noise: P(t' < 0.5) = P(t < 1/(k+1)) = 0.25
  assert abs(np.mean(t < 0.5) - 0.25) < 0.02


def test_bad_names_are_named():
  with pytest.raises(ValueError, match="diffusion.path"):
    paths.Path("nope")
  with pytest.raises(ValueError, match="diffusion.prediction"):
    predictions.coefficients(paths.Path("flow"), "nope", 0.5)


def test_continuous_paths_closed_forms():
  t = jnp.linspace(0.0, 1.0, 11)
  a, b = paths.Path("vp_linear").ab(t)
  np.testing.assert_allclose(a ** 2 + b ** 2, 1.0, atol=1e-6)
  # ᾱ(t) = exp(−∫β) with β linear from 0.1 to 20: ᾱ(1) = exp(−10.05)
  np.testing.assert_allclose(a[-1] ** 2, np.exp(-10.05), rtol=1e-4)
  a2, b2 = paths.Path("sub_vp").ab(t)
  np.testing.assert_allclose(a2, a)
  np.testing.assert_allclose(b2, 1.0 - a ** 2, atol=1e-6)
  a, b = paths.Path("vp_cosine").ab(t)
  np.testing.assert_allclose(a ** 2 + b ** 2, 1.0, atol=1e-6)
  assert float(b[0]) == 0.0 and float(a[-1]) < 1e-3
  a, b = paths.Path("ve", sigma_min=0.01, sigma_max=50.0).ab(jnp.array([0.0, 0.5, 1.0]))
  np.testing.assert_allclose(a, 1.0)
  np.testing.assert_allclose(b, [0.0, np.sqrt(0.01 * 50.0), 50.0], rtol=1e-5)
  edm = paths.Path("edm", sigma_min=0.002, sigma_max=80.0, rho=7.0)
  _, b = edm.ab(jnp.array([1e-7, 0.5, 1.0]))
  lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
  np.testing.assert_allclose(b, [0.002, ((lo + hi) / 2) ** 7, 80.0], rtol=1e-4)


def test_edm_prediction_is_karras_preconditioning():
  """F target = (y − c_skip(σ)·(y + σn)) / c_out(σ) (Karras et al. 2022, eq. 8)."""
  path = paths.Path("edm", sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
  kx, kz = jax.random.split(jax.random.key(0))
  x, z = jax.random.normal(kx, (5, 3)), jax.random.normal(kz, (5, 3))
  t = jnp.linspace(0.1, 0.9, 5)
  sigma = path.ab(t)[1][:, None]
  c_skip = 0.25 / (sigma ** 2 + 0.25)
  c_out = sigma * 0.5 / jnp.sqrt(sigma ** 2 + 0.25)
  np.testing.assert_allclose(predictions.target(path, "edm", x, z, t),
                             (x - c_skip * (x + sigma * z)) / c_out, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(predictions.input_scale(path, "edm", t),
                             1.0 / np.sqrt(np.asarray(sigma[:, 0]) ** 2 + 0.25), rtol=1e-5)


def _weight(path, prediction, kind, t, gamma=5.0):
  cfg = base().diffusion
  cfg.prediction, cfg.loss_weight, cfg.min_snr_gamma = prediction, kind, gamma
  return np.asarray(predictions.loss_weight(cfg, path, t))


def test_loss_weights_match_published_forms():
  t = jnp.linspace(0.02, 0.98, 25)
  vp = paths.Path("vp_linear")
  snr = np.asarray(vp.snr(t))
  # Min-SNR-γ (Hang et al. 2023): ε-prediction min(SNR, γ)/SNR, v-prediction min(SNR, γ)/(SNR + 1)
  np.testing.assert_allclose(_weight(vp, "eps", "min_snr", t), np.minimum(snr, 5) / snr, rtol=1e-4)
  np.testing.assert_allclose(_weight(vp, "v", "min_snr", t), np.minimum(snr, 5) / (snr + 1), rtol=1e-4)
  np.testing.assert_allclose(_weight(vp, "eps", "snr", t), 1.0, rtol=1e-4)
  edm = paths.Path("edm", sigma_min=0.002, sigma_max=80.0)
  np.testing.assert_allclose(_weight(edm, "edm", "edm", t), 1.0, rtol=1e-4)
  np.testing.assert_allclose(_weight(vp, "eps", "uniform", t), 1.0)


def test_vlb_weight_is_ddpm_eq_12():
  """For ε-prediction, L_{t−1} = β_t² / (2 σ_t² α_t (1 − ᾱ_t)) · ‖ε − ε_θ‖² with
  σ_t² = β̃_t (Ho et al. 2020, eq. 12), per dimension."""
  T = 1000
  path = paths.Path("vp_discrete", T, "linear")
  betas = paths.ddpm_betas("linear", T)
  alpha_bar = path.alpha_bar_table()
  i = np.array([2, 10, 100, 500, 999])
  beta, ab_t, ab_s = betas[i - 1], alpha_bar[i], alpha_bar[i - 1]
  post_var = beta * (1 - ab_s) / (1 - ab_t)
  expected = beta ** 2 / (2 * post_var * (1 - beta) * (1 - ab_t))
  np.testing.assert_allclose(_weight(path, "eps", "vlb", jnp.asarray(i / T)), expected, rtol=2e-3)


def test_vlb_weight_at_the_first_step_is_the_gaussian_decoder():
  """t = 1/T is L_0: a Gaussian decoder of variance b²/a² gives ½·SNR·‖x̂₀ − x₀‖²,
  i.e. exactly ½·‖ε̂ − ε‖² for ε-prediction (finite, where ½(SNR(0) − SNR) is not)."""
  path = paths.Path("vp_discrete", 1000, "linear")
  np.testing.assert_allclose(_weight(path, "eps", "vlb", jnp.asarray([1 / 1000])), [0.5], rtol=1e-4)
