"""Higher-order solvers (dpm_solver_3m, unipc, ipndm), consistency sampling and explicit
time grids.

Orders are measured on Gaussian data x ~ N(μ, s²·I), where the PF-ODE map is known: the
marginal of x_t = a·x + b·z is N(a·μ, a²s² + b²) per dimension, the velocity field is
affine in x_t, so its flow is an increasing affine map between the marginals,

    x₀ = μ + s·(x_t − a_t·μ)/sqrt(a_t²·s² + b_t²),

which is also the exact consistency function f(x_t, t). At t = 1 on the flow path
(a = 0, b = 1) it is x₀ = μ + s·x₁.
"""
import jax
import jax.numpy as jnp
import mixture
import numpy as np
import pytest

from diffusion_jax import samplers
from diffusion_jax.diffusion import paths, predictions
from diffusion_jax.samplers import spacing

MU = jnp.array([1.0, -0.5])
S = 0.5
NEW = ("dpm_solver_3m", "unipc", "ipndm", "consistency")


def gaussian_model_fn(path, prediction):
  """A 'network' that outputs the exact prediction (posterior mean based) of any type."""
  def model_fn(x_t, t, labels):
    del labels
    a, b = (v[:, None] for v in path.ab(t))
    x0 = MU + a * S ** 2 / (a ** 2 * S ** 2 + b ** 2) * (x_t - a * MU)
    c, d = (v[:, None] for v in predictions.coefficients(path, prediction, t))
    return c * x0 + d * (x_t - a * x0) / b
  return model_fn


def ode_map(path, x_t, t):
  """The exact PF-ODE map (x_t, t) ↦ x₀ for the Gaussian data (module docstring)."""
  a, b = path.ab(t)
  return MU + S * (x_t - a * MU) / jnp.sqrt(a ** 2 * S ** 2 + b ** 2)


ORDER_PATHS = {"flow-velocity": (paths.Path("flow"), "velocity"),
               "vp_linear-eps": (paths.Path("vp_linear"), "eps")}
# (sampler, steps in the asymptotic range on the log-SNR grid, bounds on the fitted slope).
# heun, dpm_solver_2m: 2nd order. ipndm: iPNDM's fixed Adams–Bashforth coefficients on
# a grid far from uniform in σ are 2nd order (see its docstring). dpm_solver_3m: 3rd
# order (measured 4–5: the end steps' errors are small for this data); unipc (UniP-3 +
# UniC): order 4 nominally (measured 5+). Past 32 steps the 3rd/4th-order errors reach
# the ~4e-5 floor of the grid's fixed end points (σ ∈ [0.002, 80], first-order steps
# from σ(1) and to 0), below which slopes mean nothing.
ORDER_CASES = [
    ("heun", {}, (16, 32, 64), 1.7, 2.5),
    ("dpm_solver_2m", {}, (16, 32, 64), 1.7, 2.5),
    ("ipndm", {}, (16, 32, 64), 1.8, 2.7),
    ("dpm_solver_3m", {}, (8, 16, 32), 2.5, None),
    ("unipc", {}, (8, 16, 32), 3.0, None),
    ("unipc", {"variant": "bh1"}, (8, 16, 32), 3.0, None),
]


def _max_errors(name, opts, path, prediction, steps_list, n=64):
  x1 = jax.random.normal(jax.random.key(0), (n, 2))
  exact = ode_map(path, x1, 1.0)
  den = samplers.make_denoiser(gaussian_model_fn(path, prediction), path, prediction,
                               jnp.zeros(n, jnp.int32))
  errs = []
  for steps in steps_list:
    x0, _ = jax.jit(lambda x, steps=steps: samplers.get(name)(
        den, path, x, None, steps, spacing="logsnr", **opts))(x1)
    errs.append(float(jnp.max(jnp.abs(x0 - exact))))
  return np.array(errs)


@pytest.mark.parametrize("case", ORDER_PATHS)
@pytest.mark.parametrize("name,opts,steps,lo,hi", ORDER_CASES,
                         ids=[c[0] + "".join(f"-{v}" for v in c[1].values()) for c in ORDER_CASES])
def test_order_on_gaussian_data(name, opts, steps, lo, hi, case):
  """log-log slope of max |x₀ − exact| against the number of steps."""
  errs = _max_errors(name, opts, *ORDER_PATHS[case], steps)
  slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
  assert errs[-1] > 1e-5, errs   # well above float32 round-off
  assert slope >= lo and (hi is None or slope <= hi), (slope, errs)


def gaussian_consistency_fn(path):
  """The exact consistency function of the Gaussian data, as a denoiser (x̂₀, ε̂)."""
  def den(x_t, t):
    a, b = path.ab(t)
    x0 = ode_map(path, x_t, t)
    return x0, (x_t - a * x0) / jnp.where(b > 0, b, 1.0)
  return den


ALL_PATHS = [(paths.Path("flow"), "velocity"), (paths.Path("vp_discrete", 1000, "linear"), "eps"),
             (paths.Path("vp_linear"), "v"), (paths.Path("vp_cosine"), "x"),
             (paths.Path("sub_vp"), "score"), (paths.Path("ve"), "eps"),
             (paths.Path("edm"), "edm")]


@pytest.mark.parametrize("path,prediction", ALL_PATHS, ids=[p.kind for p, _ in ALL_PATHS])
def test_every_path_and_prediction(path, prediction):
  """20 log-SNR steps reach the exact ODE map to < 0.05 (measured ≤ 0.025) from x₁ on
  every path; one consistency step with the exact consistency function is the map."""
  n = 256
  x1 = jax.random.normal(jax.random.key(0), (n, 2)) * path.ab(1.0)[1]
  keys = jax.random.split(jax.random.key(1), n)
  exact = ode_map(path, x1, 1.0)
  den = samplers.make_denoiser(gaussian_model_fn(path, prediction), path, prediction,
                               jnp.zeros(n, jnp.int32))
  for name in NEW[:3]:
    x0, nfe = jax.jit(lambda x, name=name: samplers.get(name)(den, path, x, keys, 20,
                                                               spacing="logsnr"))(x1)
    assert nfe == 20
    assert float(jnp.max(jnp.abs(x0 - exact))) < 0.05, name
  x0, nfe = samplers.consistency(gaussian_consistency_fn(path), path, x1, keys, 1)
  assert nfe == 1
  np.testing.assert_allclose(x0, exact, atol=1e-4)


@pytest.mark.parametrize("path_name", ["flow", "vp_cosine"])
def test_sdedit_start_is_solved_to_the_exact_map(path_name):
  """Started at t_start = 0.6 from any x, the ODE solvers follow the map from t = 0.6."""
  path, t0, n = paths.Path(path_name), 0.6, 128
  x = jax.random.normal(jax.random.key(3), (n, 2))
  den = samplers.make_denoiser(gaussian_model_fn(path, "eps"), path, "eps",
                               jnp.zeros(n, jnp.int32))
  exact = ode_map(path, x, jnp.float32(t0))
  for name in NEW[:3]:
    x0, _ = samplers.get(name)(den, path, x, None, 30, t_start=t0)
    assert float(jnp.max(jnp.abs(x0 - exact))) < 0.01, name


@pytest.mark.parametrize("path", [paths.Path("flow"), paths.Path("vp_discrete", 1000, "linear")],
                         ids=["flow", "vp_discrete"])
def test_explicit_grid_equals_the_named_spacing_bitwise(path):
  """Every sampler takes its grid from `spacing.grid`, so the grid's bits are what
  matter; two samplers (one with trace-time coefficients) confirm it end to end."""
  n, steps = 16, 6
  times = np.asarray(spacing.grid(path, steps, "karras"))
  for given in (times, tuple(times.tolist()), list(times.tolist())):
    np.testing.assert_array_equal(spacing.grid(path, steps, given), times)
  x1 = jax.random.normal(jax.random.key(0), (n, 2))
  keys = jax.random.split(jax.random.key(1), n)
  den = samplers.make_denoiser(mixture.model_fn(path, "eps"), path, "eps",
                               jnp.zeros(n, jnp.int32))
  for name in ("ddpm", "unipc"):
    run = lambda sp, name=name: np.asarray(samplers.get(name)(den, path, x1, keys, steps,
                                                              spacing=sp)[0])
    np.testing.assert_array_equal(run(times), run("karras"), err_msg=name)


@pytest.mark.parametrize("times,steps,message", [
    ((1.0, 0.5, 0.0), 3, r"3 times t_0..t_N make 2 steps, but num_steps=3"),
    ((1.0, 0.5, 0.6, 0.0), 3, r"strictly decreasing, but t_1=0.5 <= t_2=0.6"),
    ((0.9, 0.5, 0.0), 2, r"t_0=0.9 must equal t_start=1.0"),
    ((1.0, 0.5, 0.1), 2, r"last time t_N=0.1 must be 0"),
    ((1.0, 1.5, 0.0), 2, r"in \[0, 1\]"),
    (((1.0, 0.5), (0.5, 0.0)), 1, r"1-D sequence"),
    (("a", "b"), 1, r"not a sequence of numbers"),
])
def test_explicit_grid_errors_name_the_problem(times, steps, message):
  with pytest.raises(ValueError, match=message):
    spacing.grid(paths.Path("flow"), steps, times)


def test_explicit_grid_on_a_discrete_path_is_snapped_without_duplicates():
  path = paths.Path("vp_discrete", 1000, "linear")
  np.testing.assert_array_equal(spacing.grid(path, 2, (1.0, 0.5004, 0.0)),
                                np.float32([1.0, 0.5, 0.0]))
  with pytest.raises(ValueError, match=r"snap to the same step 1/1000"):
    spacing.grid(path, 3, (1.0, 0.0012, 0.0008, 0.0))
  # SDEdit: t_0 = t_start within 1e-6.
  assert float(spacing.grid(paths.Path("flow"), 1, (0.6 + 5e-7, 0.0), t_start=0.6)[0]) == \
      np.float32(0.6)
  with pytest.raises(ValueError, match="concrete"):
    jax.jit(lambda t: spacing.grid(paths.Path("flow"), 2, t))(jnp.array([1.0, 0.5, 0.0]))


@pytest.mark.parametrize("path", [paths.Path("flow"), paths.Path("vp_discrete", 1000, "linear")],
                         ids=["flow", "vp_discrete"])
def test_consistency_sampling_with_the_exact_consistency_function(path):
  """1 and 2 steps (fresh noise at t_1 = 0.5) both give the data's mean and std."""
  n = 4000
  keys = jax.random.split(jax.random.key(1), n)
  x1 = jax.random.normal(jax.random.key(2), (n, 2))
  for steps in (1, 2):
    x0, nfe = jax.jit(lambda x, k, steps=steps: samplers.consistency(
        gaussian_consistency_fn(path), path, x, k, steps))(x1, keys)
    assert nfe == steps
    x0 = np.asarray(x0)
    np.testing.assert_allclose(x0.mean(0), MU, atol=0.04)
    np.testing.assert_allclose(x0.std(0), [S, S], atol=0.04)
  # Two steps re-noise: not the deterministic one-step map of x₁.
  one = samplers.consistency(gaussian_consistency_fn(path), path, x1, keys, 1)[0]
  two = samplers.consistency(gaussian_consistency_fn(path), path, x1, keys, 2)[0]
  assert float(jnp.max(jnp.abs(one - two))) > 0.1


MIX_CASES = {"flow-velocity": (paths.Path("flow"), "velocity"),
             "vp-eps": (paths.Path("vp_discrete", 1000, "linear"), "eps")}


@pytest.mark.parametrize("case", MIX_CASES)
@pytest.mark.parametrize("name", NEW)
def test_new_samplers_on_the_mixture(name, case):
  """At 20 NFE (uniform t) the ODE solvers are within 0.05 sliced-W₂ of the mixture
  (measured 0.027–0.042; noise floor ≈ 0.02 with 3000 samples; tests/samplers/
  test_mixture.py shows the distance rejects 2-step samples). `consistency` with the
  posterior mean instead of a consistency function re-noises a mean, so it
  under-disperses (measured 0.06–0.08 at 20 steps): for it only finiteness is checked."""
  path, prediction = MIX_CASES[case]
  n = 3000
  keys = jax.random.split(jax.random.key(1), n)
  x1 = jax.random.normal(jax.random.key(2), (n, 2))
  den = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                               jnp.zeros(n, jnp.int32))
  x0, nfe = jax.jit(lambda x, k: samplers.get(name)(den, path, x, k, 20))(x1, keys)
  assert nfe == 20 and np.all(np.isfinite(x0))
  if name != "consistency":
    assert mixture.sliced_wasserstein(x0) < 0.05


def test_option_errors():
  path = paths.Path("flow")
  x = jnp.zeros((1, 2))
  den = lambda x, t: (x, x)
  with pytest.raises(ValueError, match="order=4"):
    samplers.unipc(den, path, x, None, 5, order=4)
  with pytest.raises(ValueError, match="variant='bh3'"):
    samplers.unipc(den, path, x, None, 5, variant="bh3")
  with pytest.raises(ValueError, match="order=5"):
    samplers.ipndm(den, path, x, None, 5, order=5)


def test_low_orders_and_few_steps_are_consistent():
  """order=1 of ipndm and one step of every new solver are DDIM (first order)."""
  path, n = paths.Path("vp_cosine"), 32
  x1 = jax.random.normal(jax.random.key(0), (n, 2))
  keys = jax.random.split(jax.random.key(1), n)  # unused by η = 0
  den = samplers.make_denoiser(gaussian_model_fn(path, "eps"), path, "eps",
                               jnp.zeros(n, jnp.int32))
  run = lambda name, steps, **kw: jax.jit(lambda x: samplers.get(name)(
      den, path, x, keys, steps, **kw)[0])(x1)
  ddim1, ddim7 = run("ddim", 1), run("ddim", 7)
  np.testing.assert_allclose(run("ipndm", 7, order=1), ddim7, atol=2e-5)
  for name in NEW[:3]:
    np.testing.assert_allclose(run(name, 1), ddim1, atol=2e-5, err_msg=name)
  # UniPC order 1 is DDIM plus the UniC-1 corrector: closer to the map than DDIM.
  err = lambda x: float(jnp.max(jnp.abs(x - ode_map(path, x1, 1.0))))
  assert err(run("unipc", 7, order=1)) < 0.8 * err(ddim7)
