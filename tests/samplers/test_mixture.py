"""The new samplers against a 2-D Gaussian mixture whose denoiser is exact (`mixture.py`).

Distributions are compared by sliced Wasserstein distance (noise floor ≈ 0.02 with
3000 samples); orders of accuracy by the error of the ODE solution map x₁ ↦ x₀ against
a fine Heun reference from the same x₁ (no sampling noise there).
"""
import time

import jax
import jax.numpy as jnp
import mixture
import numpy as np
import pytest

from diffusion_jax import samplers
from diffusion_jax.diffusion import paths
from diffusion_jax.samplers import spacing

FLOW = (paths.Path("flow"), "velocity")
VP = (paths.Path("vp_discrete", 1000, "linear"), "eps")
N = 3000


def _run(name, path, prediction, n, steps, **opts):
  keys = jax.random.split(jax.random.key(1), n)
  x1 = jax.random.normal(jax.random.key(2), (n, 2))
  denoiser = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                                    jnp.zeros(n, jnp.int32))
  fn = jax.jit(lambda x, k: samplers.get(name)(denoiser, path, x, k, steps, **opts)[0])
  return np.asarray(fn(x1, keys))


CASES = [  # (sampler, steps that converge); 2 steps must not
    ("heun", 20), ("dpm_solver_2m", 20), ("sde", 100), ("pc", 50), ("edm", 25)]


@pytest.mark.parametrize("path,prediction", [FLOW, VP], ids=["flow-velocity", "vp-eps"])
@pytest.mark.parametrize("name,steps", CASES)
def test_sampler_converges_to_mixture(name, steps, path, prediction):
  good = mixture.sliced_wasserstein(_run(name, path, prediction, N, steps))
  bad = mixture.sliced_wasserstein(_run(name, path, prediction, N, 2))
  assert good < 0.05 and bad > 0.2, (good, bad)


def test_karras_spacing_converges():
  x0 = _run("heun", *FLOW, N, 10, spacing="karras")
  assert mixture.sliced_wasserstein(x0) < 0.05


def test_edm_with_churn_converges():
  x0 = _run("edm", *VP, N, 50, s_churn=40.0)
  assert mixture.sliced_wasserstein(x0) < 0.05


def test_nfe():
  path, prediction = FLOW
  den = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                               jnp.zeros(1, jnp.int32))
  x, k = jnp.zeros((1, 2)), jax.random.split(jax.random.key(0), 1)

  def nfe(name, **opts):  # read off while tracing: nothing is compiled
    box = []
    jax.eval_shape(lambda x: box.append(samplers.get(name)(den, path, x, k, 7, **opts)[1]) or x, x)
    return box[0]

  assert (nfe("heun"), nfe("dpm_solver_2m"), nfe("sde")) == (13, 7, 7)
  assert (nfe("pc"), nfe("pc", corrector_steps=3), nfe("edm", s_churn=5.0)) == (14, 28, 13)


def _ode_errors(path, prediction, runs, ref_steps=1000, n=512):
  """RMS error of x₀ against a `ref_steps` Heun solution from the same x₁, all on the
  log-SNR spacing (uniform t puts the large, low-order last step where the mixture's
  narrow modes make the ODE stiff, and hides the orders)."""
  x1 = jax.random.normal(jax.random.key(5), (n, 2))
  keys = jax.random.split(jax.random.key(6), n)  # unused: all are deterministic here
  den = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                               jnp.zeros(n, jnp.int32))
  solve = lambda name, steps: jax.jit(
      lambda x: samplers.get(name)(den, path, x, keys, steps, spacing="logsnr")[0])(x1)
  ref = solve("heun", ref_steps)
  return [float(jnp.sqrt(jnp.mean((solve(name, s) - ref) ** 2))) for name, s in runs]


def test_ode_orders_flow():
  """Heun is 2nd order (error ÷ ≥ 4 per doubling) and beats Euler at equal NFE (39);
  DPM-Solver++(2M) beats DDIM at 10 and 20 NFE (measured: 0.060 vs 0.097, 0.014 vs 0.052)."""
  heun10, heun20, euler39, dpm10, dpm20, ddim10, ddim20 = _ode_errors(*FLOW, [
      ("heun", 10), ("heun", 20), ("euler", 39), ("dpm_solver_2m", 10),
      ("dpm_solver_2m", 20), ("ddim", 10), ("ddim", 20)])
  assert heun10 / heun20 > 4.0, (heun10, heun20)
  assert heun20 < euler39 / 3, (heun20, euler39)
  assert dpm10 < ddim10 / 1.3 and dpm20 < ddim20 / 2.5, (dpm10, ddim10, dpm20, ddim20)
  assert dpm10 / dpm20 > 3.0, (dpm10, dpm20)


def test_ode_orders_vp_eps():
  """The same on discrete VP with ε-prediction (measured: 0.045 vs 0.085, 0.011 vs 0.044)."""
  dpm10, dpm20, ddim10, ddim20 = _ode_errors(*VP, [
      ("dpm_solver_2m", 10), ("dpm_solver_2m", 20), ("ddim", 10), ("ddim", 20)])
  assert dpm10 < ddim10 / 1.3 and dpm20 < ddim20 / 2.5, (dpm10, ddim10, dpm20, ddim20)
  assert dpm10 / dpm20 > 3.0, (dpm10, dpm20)


PATHS = [paths.Path("flow"), paths.Path("vp_discrete", 1000, "linear"),
         paths.Path("vp_discrete", 1000, "cosine"), paths.Path("vp_discrete", 20, "linear")]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p.kind}-{p.beta_schedule}-{p.num_steps}")
@pytest.mark.parametrize("name", spacing.SPACINGS)
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_spacing_is_a_decreasing_grid(name, path, steps):
  t = np.asarray(spacing.grid(path, steps, name))
  assert t.shape == (steps + 1,) and t[0] == 1.0 and t[-1] == 0.0
  assert np.all(np.diff(t) < 0)
  if path.discrete:
    np.testing.assert_allclose(t * path.num_steps, np.round(t * path.num_steps), atol=1e-3)


def test_uniform_spacing_is_the_default_grid():
  for path in PATHS:
    np.testing.assert_array_equal(spacing.grid(path, 10), samplers.time_grid(path, 10))


def test_karras_matches_edm_formula():
  """σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, σ = t/(1 − t) on the flow
  path, σ = b/a on a continuous-time reading of the VP path (not snapped)."""
  n, rho, smin, smax = 12, 7.0, 0.002, 80.0
  i = np.arange(n)
  edm = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
  t = np.asarray(spacing.karras(paths.Path("flow"), n), np.float64)
  np.testing.assert_allclose(t[1:-1] / (1 - t[1:-1]), edm[1:], rtol=1e-4)
  # VP: the inversion of σ(t) by bisection reproduces the σ's before snapping.
  vp = paths.Path("vp_discrete", 1000, "cosine")
  lo, hi = spacing.sigma_range(vp)
  sig = spacing.karras_sigmas(n, lo, hi)
  np.testing.assert_allclose(spacing.sigma(vp, spacing.inverse_sigma(vp, sig)), sig, rtol=1e-4)
  assert hi == 80.0 and lo == pytest.approx(float(spacing.sigma(vp, 1e-3)))


def test_logsnr_is_uniform_in_log_snr():
  t = np.asarray(spacing.logsnr(paths.Path("flow"), 10), np.float64)[1:-1]
  lam = 2 * np.log((1 - t) / t)
  np.testing.assert_allclose(np.diff(lam), np.diff(lam).mean(), rtol=1e-3)


def test_compile_time_does_not_grow_with_steps():
  path, prediction = FLOW
  n = 64
  den = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                               jnp.zeros(n, jnp.int32))
  x, keys = jnp.zeros((n, 2)), jax.random.split(jax.random.key(0), n)

  def compile_seconds(name, steps):
    fn = jax.jit(lambda x, k: samplers.get(name)(den, path, x, k, steps)[0])
    start = time.perf_counter()
    fn.lower(x, keys).compile()
    return time.perf_counter() - start

  for name in ("heun", "pc"):
    few, many = compile_seconds(name, 10), compile_seconds(name, 1000)
    assert many < 2 * few + 0.5, (name, few, many)


@pytest.mark.parametrize("path,prediction", [
    FLOW, VP, (paths.Path("ve", sigma_min=0.01, sigma_max=3.0), "score")],
    ids=["flow-velocity", "vp-eps", "ve-score"])
def test_annealed_langevin_converges(path, prediction):
  """NCSN's sampler: 20 noise levels × 20 Langevin steps reach the mixture (Langevin
  needs far more NFE than the ODE solvers: 401 here); a single level does not."""
  b1 = float(path.ab(1.0)[1])
  run = lambda levels: np.asarray(_scaled_run(path, prediction, levels, b1))
  good, bad = mixture.sliced_wasserstein(run(20)), mixture.sliced_wasserstein(run(1))
  assert good < 0.06 and bad > 0.2, (good, bad)


def _scaled_run(path, prediction, levels, b1):
  """Annealed Langevin from x_1 ~ N(0, b(1)²·I) (b(1) ≠ 1 on VE paths)."""
  keys = jax.random.split(jax.random.key(1), N)
  x1 = b1 * jax.random.normal(jax.random.key(2), (N, 2))
  den = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                               jnp.zeros(N, jnp.int32))
  return jax.jit(lambda x, k: samplers.annealed_langevin(den, path, x, k, levels,
                                                         steps_per_level=20)[0])(x1, keys)
