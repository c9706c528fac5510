"""Samplers: each integrates from t = 1 (noise) to t = 0 (data) with one compiled loop.

All take (denoiser, path, x_init, keys, num_steps, ..., spacing=, t_start=) and return
(x₀ sample, NFE). x_init is pure noise at t_start = 1, or x_{t₀} at t_start = t₀ < 1
(SDEdit; see `editing.py`).
`keys` holds one PRNG key per example [B]: a sample's trajectory depends only on its
own key, so results do not change with batch size, padding or device count.
They loop with `lax.fori_loop`, so compile time does not grow with num_steps and one
compile serves any batch of the same shape. They work for every path and prediction
type because they see only the denoiser's (x̂₀, ε̂) and the path's (a, b).

For s < t the forward transition of a Gaussian path is
    q(x_t | x_s) = N(a_{t|s}·x_s, σ²_{t|s}),  a_{t|s} = a_t/a_s,  σ²_{t|s} = b_t² − a_{t|s}²·b_s²
and its posterior (DDPM's q(x_{t−1} | x_t, x_0), Ho et al. 2020 eq. 7; VDM appendix A) is
    q(x_s | x_t, x₀) = N(μ, σ̃²),
    μ = a_{t|s}·b_s²/b_t² · x_t + a_s·σ²_{t|s}/b_t² · x₀,   σ̃² = σ²_{t|s}·b_s²/b_t².
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import predictions
from diffusion_jax.samplers import spacing as spacing_lib


def time_grid(path, num_steps: int):
  """t_0 = 1 > t_1 > ... > t_N = 0, uniform in t (snapped to a discrete path's grid).
  Other spacings: `spacing.grid`."""
  return spacing_lib.uniform(path, num_steps)


def _noise(keys, k, like):
  """Standard normal noise for step k, drawn per example from its own key."""
  return jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), like.shape[1:],
                                                like.dtype))(keys)


def _transition(path, t, s):
  """(a_t, b_t, a_s, b_s, a_{t|s}, σ²_{t|s}) for s < t."""
  a_t, b_t = path.ab(t)
  a_s, b_s = path.ab(s)
  a_ts = a_t / a_s
  var_ts = jnp.maximum(b_t ** 2 - a_ts ** 2 * b_s ** 2, 0.0)
  return a_t, b_t, a_s, b_s, a_ts, var_ts


def euler(denoiser, path, x, keys, num_steps: int, spacing: str = "uniform",
  t_start: float = 1.0):
  """Euler on the probability-flow ODE dx/dt = a'(t)·x̂₀ + b'(t)·ε̂ (rectified flow's
  sampler when the network predicts velocity). Deterministic: `keys` are unused."""
  del keys
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)

  def step(k, x):
    t, s = grid[k], grid[k + 1]
    x0, eps = denoiser(x, t)
    v = predictions.velocity(path, x0, eps, jnp.full((x.shape[0],), t))
    return x + (s - t) * v

  return jax.lax.fori_loop(0, num_steps, step, x), num_steps


def ddpm(denoiser, path, x, keys, num_steps: int, variance: str = "small",
         spacing: str = "uniform",
  t_start: float = 1.0):
  """DDPM ancestral sampling (Ho et al. 2020, Alg. 2), generalised to any path and
  any sub-grid: x_s ~ N(μ(x_t, x̂₀), σ²) with σ² = σ̃² ('small', the posterior
  variance β̃_t) or σ²_{t|s} ('large', β_t). No noise is added on the last step."""
  if variance not in ("small", "large"):
    raise ValueError(f"variance={variance!r}: expected 'small' or 'large'")
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)

  def step(k, x):
    t, s = grid[k], grid[k + 1]
    x0, _ = denoiser(x, t)
    _, b_t, a_s, b_s, a_ts, var_ts = _transition(path, t, s)
    mean = a_ts * b_s ** 2 / b_t ** 2 * x + a_s * var_ts / b_t ** 2 * x0
    var = var_ts * b_s ** 2 / b_t ** 2 if variance == "small" else var_ts
    noise = _noise(keys, k, x)
    return mean + jnp.where(s > 0, jnp.sqrt(var), 0.0) * noise

  return jax.lax.fori_loop(0, num_steps, step, x), num_steps


def ddim(denoiser, path, x, keys, num_steps: int, eta: float = 0.0,
         spacing: str = "uniform",
  t_start: float = 1.0):
  """DDIM (Song et al. 2021, eq. 12): x_s = a_s·x̂₀ + sqrt(b_s² − σ²)·ε̂ + σ·z with
  σ = η·σ̃. η = 0 is deterministic; η = 1 is ancestral sampling with σ̃²."""
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)

  def step(k, x):
    t, s = grid[k], grid[k + 1]
    x0, eps = denoiser(x, t)
    _, b_t, a_s, b_s, _, var_ts = _transition(path, t, s)
    var = eta ** 2 * var_ts * b_s ** 2 / b_t ** 2
    noise = _noise(keys, k, x)
    return a_s * x0 + jnp.sqrt(jnp.maximum(b_s ** 2 - var, 0.0)) * eps + jnp.sqrt(var) * noise

  return jax.lax.fori_loop(0, num_steps, step, x), num_steps


def _pf_velocity(denoiser, path, x, t):
  """dx/dt = a'(t)·x̂₀ + b'(t)·ε̂ at (x, t): one denoiser call."""
  x0, eps = denoiser(x, t)
  return predictions.velocity(path, x0, eps, jnp.full((x.shape[0],), t))


def heun(denoiser, path, x, keys, num_steps: int, spacing: str = "uniform",
  t_start: float = 1.0):
  """Heun's 2nd-order method on the PF-ODE dx/dt = a'(t)·x̂₀ + b'(t)·ε̂ (Karras et al.
  2022, Alg. 1): an Euler step to s, then the trapezoid of the slopes at t and s. The
  last step (to t_N = 0) is plain Euler, so NFE = 2N − 1. Deterministic."""
  del keys
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)

  def step(k, x):
    t, s = grid[k], grid[k + 1]
    d = _pf_velocity(denoiser, path, x, t)
    d_next = _pf_velocity(denoiser, path, x + (s - t) * d, s)
    return x + (s - t) * 0.5 * (d + d_next)

  x = jax.lax.fori_loop(0, num_steps - 1, step, x)
  # The slope at t = 0 needs ε̂ where b = 0, and Euler there costs one call less.
  t, s = grid[num_steps - 1], grid[num_steps]
  return x + (s - t) * _pf_velocity(denoiser, path, x, t), 2 * num_steps - 1


def dpm_solver_2m(denoiser, path, x, keys, num_steps: int, spacing: str = "uniform",
  t_start: float = 1.0):
  """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): the data-prediction
  multistep solver in λ = log(a/b). With h = λ_s − λ_t and r = h_prev/h,

      x_s = (b_s/b_t)·x_t + (a_s − a_t·b_s/b_t)·D,   D = (1 + 1/(2r))·x̂₀(t) − 1/(2r)·x̂₀(t_prev)

  (a_s(1 − e^{−h}) written without λ, which is infinite at a = 0 or b = 0). The first
  step, and the last one to b = 0 (h = ∞), are first order (D = x̂₀: DDIM). NFE = N."""
  del keys
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)

  def log_sigma(t):  # −λ(t); ±inf at the ends of the flow path, used only in ratios
    a, b = path.ab(t)
    return jnp.log(b) - jnp.log(a)

  def step(k, carry):
    x, x0_prev = carry
    t, s, t_prev = grid[k], grid[k + 1], grid[jnp.maximum(k - 1, 0)]
    x0, _ = denoiser(x, t)
    a_t, b_t = path.ab(t)
    a_s, b_s = path.ab(s)
    h = log_sigma(t) - log_sigma(s)
    h_prev = log_sigma(t_prev) - log_sigma(t)
    # 1/(2r) = h/(2·h_prev); an infinite previous step (from a = 0) makes it 0.
    w = jnp.where((k > 0) & (s > 0), h / (2.0 * h_prev), 0.0)
    d = (1.0 + w) * x0 - w * x0_prev
    return b_s / b_t * x + (a_s - a_t * b_s / b_t) * d, x0

  x, _ = jax.lax.fori_loop(0, num_steps, step, (x, jnp.zeros_like(x)))
  return x, num_steps


def _reverse_sde_step(path, x, x0, eps, t, s, noise):
  """One Euler–Maruyama step of the reverse SDE from t down to s (Δ = t − s > 0).

  The Gaussian path is the marginal of the forward SDE dx = f(t)·x dt + g(t) dw with
      f = a'/a,   g² = d(b²)/dt − 2f·b² = 2b·b' − 2(a'/a)·b²
  (the mean obeys m' = f·m, the variance v' = 2f·v + g²; VP: f = −β/2, g² = β). Its
  reverse (Anderson 1982; Song et al. 2021, eq. 6), with score −ε̂/b:
      x_s = x − Δ·(f·x + g²·ε̂/b) + g·√Δ·z,   no noise on the last step (s = 0).
  Where a(t) = 0 (the flow path at t = 1) f and g² are infinite; there x_t carries no
  information about x₀ and the step is the ancestral one, x_s = a_s·x̂₀ + b_s·z."""
  a_t, b_t = path.ab(t)
  da, db = path.ab_dot(t)
  a_s, b_s = path.ab(s)
  f = da / a_t
  g2 = jnp.maximum(2.0 * b_t * db - 2.0 * f * b_t ** 2, 0.0)
  dt = t - s
  em = x - dt * (f * x + g2 * eps / b_t) + jnp.where(s > 0, jnp.sqrt(g2 * dt), 0.0) * noise
  ancestral = a_s * x0 + b_s * noise
  return jnp.where(a_t > 0, em, ancestral)


def sde(denoiser, path, x, keys, num_steps: int, spacing: str = "uniform",
  t_start: float = 1.0):
  """Euler–Maruyama on the reverse-time SDE of the path (Song et al. 2021, "Score-Based
  Generative Modeling through SDEs"); see `_reverse_sde_step`. NFE = N."""
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)

  def step(k, x):
    t, s = grid[k], grid[k + 1]
    x0, eps = denoiser(x, t)
    return _reverse_sde_step(path, x, x0, eps, t, s, _noise(keys, k, x))

  return jax.lax.fori_loop(0, num_steps, step, x), num_steps


def _per_example_norm(x):
  return jnp.sqrt(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)).reshape(
      (-1,) + (1,) * (x.ndim - 1))


def pc(denoiser, path, x, keys, num_steps: int, snr: float = 0.16, corrector_steps: int = 1,
       spacing: str = "uniform",
  t_start: float = 1.0):
  """Predictor–corrector sampling (Song et al. 2021, Alg. 1/3). At each t_k (> 0):
  `corrector_steps` Langevin steps on p_t,
      x ← x + ε·score + √(2ε)·z,   ε = min(2·(snr·√d/‖score‖)², 2·(snr·b_t)²)
  (per example, so a sample does not depend on its batch; ‖z‖ ≈ √d and the cap are
  explained below),
  then the reverse-SDE predictor step to t_{k+1} (`_reverse_sde_step`). The corrector
  runs before the predictor, as in the paper's code, so it never needs the score at
  b = 0. NFE = N·(1 + corrector_steps)."""
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)
  per_step = corrector_steps + 1  # noise draws per step, each from its own fold-in
  dim = x[0].size

  def step(k, x):
    t, s = grid[k], grid[k + 1]
    b_t = path.ab(t)[1]

    def langevin(j, x):
      _, eps = denoiser(x, t)
      score = -eps / b_t
      z = _noise(keys, k * per_step + 1 + j, x)
      # ‖z‖ is taken as √d, its high-dimensional value: with the sampled ‖z‖, ε ∝ ‖z‖²
      # correlates with z and (in d = 2) doubles the effective Langevin noise.
      e = 2.0 * (snr * dim ** 0.5 / _per_example_norm(score)) ** 2
      # Capped at its value for ‖score‖ = √d/b (a pure-noise score): in low dimension
      # ‖score‖ ≈ 0 near a mode and the uncapped step throws samples out.
      e = jnp.minimum(e, 2.0 * (snr * b_t) ** 2)
      return x + e * score + jnp.sqrt(2.0 * e) * z

    x = jax.lax.fori_loop(0, corrector_steps, langevin, x)
    x0, eps = denoiser(x, t)
    return _reverse_sde_step(path, x, x0, eps, t, s, _noise(keys, k * per_step, x))

  return jax.lax.fori_loop(0, num_steps, step, x), num_steps * per_step


def _inverse_sigma(path, sig, iters: int = 40):
  """t with σ(t) = b(t)/a(t) = sig (a traced scalar), by bisection: σ is increasing."""
  def halve(_, lo_hi):
    lo, hi = lo_hi
    mid = 0.5 * (lo + hi)
    a, b = path.ab(mid)
    above = b > sig * a
    return jnp.where(above, lo, mid), jnp.where(above, mid, hi)
  _, hi = jax.lax.fori_loop(0, iters, halve, (jnp.float32(0.0), jnp.float32(1.0)))
  return hi  # σ(hi) ≥ sig: never below the requested noise level


def edm(denoiser, path, x, keys, num_steps: int, s_churn: float = 0.0, s_tmin: float = 0.05,
        s_tmax: float = 50.0, s_noise: float = 1.003, spacing: str = "karras",
  t_start: float = 1.0):
  """EDM's stochastic sampler (Karras et al. 2022, Alg. 2) on any Gaussian path, in the
  scaled variable y = x/a with noise level σ = b/a, where the PF-ODE is dy/dσ = ε̂:

      σ̂ = σ_i·(1 + γ),  γ = min(S_churn/N, √2 − 1) for σ_i ∈ [S_tmin, S_tmax], else 0,
      ŷ = y + √(σ̂² − σ_i²)·S_noise·z,
      y_{i+1} = ŷ + (σ_{i+1} − σ̂)·(ε̂(ŷ, σ̂) + ε̂(y', σ_{i+1}))/2   (Heun; Euler at the end).

  t̂ = σ⁻¹(σ̂) by bisection on the path. The Euler part is written as DDIM,
  x_{i+1} = a_{i+1}·x̂₀ + b_{i+1}·ε̂, which stays finite at a = 0 (the flow path's
  t = 1, σ = ∞: no churn and no Heun correction there). S_churn = 0 is the
  deterministic Heun sampler in σ (EDM Alg. 1). NFE = 2N − 1."""
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)
  gamma = min(s_churn / num_steps, 2 ** 0.5 - 1)

  def churn_and_euler(k, x):
    t, s = grid[k], grid[k + 1]
    a_t, b_t = path.ab(t)
    sig = b_t / jnp.where(a_t > 0, a_t, 1.0)
    churn = (a_t > 0) & (sig >= s_tmin) & (sig <= s_tmax) & (gamma > 0)
    t_hat = jnp.where(churn, jnp.minimum(_inverse_sigma(path, sig * (1 + gamma)), 1.0), t)
    a_h, b_h = path.ab(t_hat)
    sig_h = b_h / jnp.where(a_h > 0, a_h, 1.0)
    add = jnp.sqrt(jnp.maximum(sig_h ** 2 - sig ** 2, 0.0)) * s_noise
    x_hat = jnp.where(churn, a_h / a_t * x + a_h * add * _noise(keys, k, x), x)
    x0, eps = denoiser(x_hat, t_hat)
    a_s, b_s = path.ab(s)
    return x_hat, eps, sig_h, a_h, a_s * x0 + b_s * eps, s

  def step(k, x):
    _, eps, sig_h, a_h, x_next, s = churn_and_euler(k, x)
    _, eps_next = denoiser(x_next, s)
    a_s, b_s = path.ab(s)
    corr = a_s * (b_s / a_s - sig_h) * 0.5 * (eps_next - eps)
    return x_next + jnp.where(a_h > 0, corr, 0.0)

  x = jax.lax.fori_loop(0, num_steps - 1, step, x)
  return churn_and_euler(num_steps - 1, x)[4], 2 * num_steps - 1


def annealed_langevin(denoiser, path, x, keys, num_steps: int, steps_per_level: int = 10,
                      step_size: float = 0.5, spacing: str = "uniform",
  t_start: float = 1.0):
  """Annealed Langevin dynamics (NCSN; Song & Ermon 2019, Alg. 1).

  For each noise level t_0 = 1 > … > t_{N−1} of the grid, `steps_per_level` Langevin
  steps on p_t:
      x ← x + (α/2)·score + √α·z,   score = −ε̂/b_t,   α = step_size·b_t²
  (NCSN's α_i = ε·σ_i²/σ_L², with 1/σ_L² folded into step_size), then one denoising
  step to the posterior mean E[x₀ | x] at the last level (Tweedie; "denoising" of
  Jolicoeur-Martineau et al. 2021), since Langevin at t_{N−1} > 0 samples p_{t_{N−1}},
  not the data. NFE = N·steps_per_level + 1.
  """
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)

  def level(k, x):
    t = grid[k]
    b_t = path.ab(t)[1]
    alpha = step_size * b_t ** 2

    def langevin(j, x):
      _, eps = denoiser(x, t)
      return x - 0.5 * alpha * eps / b_t + jnp.sqrt(alpha) * _noise(keys, k * steps_per_level + j, x)

    return jax.lax.fori_loop(0, steps_per_level, langevin, x)

  x = jax.lax.fori_loop(0, num_steps, level, x)
  x0, _ = denoiser(x, grid[num_steps - 1])
  return x0, num_steps * steps_per_level + 1


# ----------------------------------------------------------------------------------------
# Higher-order multistep solvers and consistency sampling.
#
# Their step coefficients depend only on the grid, which is static, so they are computed
# once at trace time in float64 numpy (`_schedule`): every step is then a fixed linear
# combination of x and the stored denoiser outputs, and the infinite ends of λ = log(a/b)
# (a = 0: the flow path at t = 1; b = 0: t = 0) are handled by choosing the order of each
# step in Python, never by inf/NaN arithmetic inside the loop.


def _schedule(path, num_steps, spacing, t_start):
  """(grid float32 [N+1] for the loop, a, b, log σ = log b − log a as float64 numpy)."""
  with jax.ensure_compile_time_eval():
    grid = spacing_lib.grid(path, num_steps, spacing, t_start)
    a, b = path.ab(grid)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  with np.errstate(divide="ignore"):
    log_sigma = np.log(b) - np.log(a)  # −λ: +inf where a = 0, −inf where b = 0
  return grid, a, b, log_sigma


def _phi(k: int, x: float) -> float:
  """g_k(x) = (e^x − Σ_{j≤k} x^j/j!)/x^k = Σ_{j≥1} x^j/(j+k)!  (g_1 = (e^x − 1)/x − 1), by
  its series for small |x|, where the closed form cancels catastrophically."""
  if abs(x) < 0.5:
    term, total = 1.0 / math.factorial(k), 0.0
    for j in range(1, 30):
      term *= x / (j + k)
      total += term
    return total
  return (math.exp(x) - sum(x ** j / math.factorial(j) for j in range(k + 1))) / x ** k


def _order(log_sigma, k, n, max_order):
  """Order of step k of n: ≤ max_order, ≤ k + 1 (warm-up: the history holds k outputs),
  ≤ n − k (lower order at the final steps, as diffusers' `lower_order_final`), and only
  over finite, non-empty steps in λ: every node t_{k−p+1} .. t_{k+1} of a p-th-order
  step must have a > 0, b > 0 and a λ of its own (the step from a = 0 and the step to
  b = 0 are first order; the steps right after the one from a = 0 do not use its
  output)."""
  p = min(max_order, k + 1, n - k)
  while p > 1 and not _regular(log_sigma[k - p + 1:k + 2]):
    p -= 1
  return p


def _regular(nodes):
  """Finite nodes with strictly decreasing values (no zero-length step to divide by)."""
  return bool(np.all(np.isfinite(nodes)) and np.all(np.diff(nodes) < 0))


def _dpm3m_coefficients(a, b, log_sigma):
  """x_{k+1} = cx[k]·x_k + Σ_j cm[k, j]·x̂₀(t_{k−j}), j = 0, 1, 2; see `dpm_solver_3m`."""
  n = len(a) - 1
  cx, cm = np.zeros(n), np.zeros((n, 3))
  for k in range(n):
    a_t, b_t, a_s, b_s = a[k], b[k], a[k + 1], b[k + 1]
    cx[k] = b_s / b_t
    phi1 = a_s - a_t * b_s / b_t                      # a_s·(1 − e^{−h}), finite at a_t = 0
    p = _order(log_sigma, k, n, 3)
    if p == 1:
      cm[k] = [phi1, 0.0, 0.0]
      continue
    h = log_sigma[k] - log_sigma[k + 1]
    r0 = (log_sigma[k - 1] - log_sigma[k]) / h
    if p == 2:                                        # DPM-Solver++(2M), Lu et al. Alg. 2
      cm[k] = [phi1 * (1 + 0.5 / r0), -phi1 * 0.5 / r0, 0.0]
      continue
    r1 = (log_sigma[k - 2] - log_sigma[k - 1]) / h
    d1_0 = np.array([1.0, -1.0, 0.0]) / r0            # ≈ h·x̂₀' (between t_{k−1} and t_k)
    d1_1 = np.array([0.0, 1.0, -1.0]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)        # ≈ h·x̂₀'(t_k)
    d2 = (d1_0 - d1_1) / (r0 + r1)                    # ≈ h²·x̂₀''(t_k)/2
    # x_s = (b_s/b_t)·x + a_s·∫_0^h e^{u−h}·x̂₀(λ_t + u) du with x̂₀'s quadratic Taylor
    # polynomial: ∫_0^h e^{u−h}·u du = h·c2 and ∫_0^h e^{u−h}·u²/2 du = −h²·c3, so the
    # x̂₀'' term is −a_s·c3·h²·x̂₀'' = −2·a_s·c3·D₂ (diffusers: −a_s·c3·D₂).
    c2 = -_phi(1, -h)                                 # (e^{−h} − 1)/h + 1
    c3 = _phi(2, -h)                                  # (e^{−h} − 1 + h)/h² − 1/2
    cm[k] = phi1 * np.array([1.0, 0.0, 0.0]) + a_s * c2 * d1 - 2.0 * a_s * c3 * d2
  return cx, cm


def dpm_solver_3m(denoiser, path, x, keys, num_steps: int, spacing: str = "uniform",
                  t_start: float = 1.0):
  """DPM-Solver++(3M) (Lu, Zhou, Bao, Chen, Li, Zhu 2022, "DPM-Solver++: Fast Solver for
  Guided Sampling of Diffusion Probabilistic Models": the multistep data-prediction
  solvers, of which Alg. 2 is the 2M; the 3rd-order multistep step is the one of the
  authors' code and of diffusers' DPMSolverMultistepScheduler with
  algorithm_type='dpmsolver++', solver_order=3, up to the coefficient below). In
  λ = log(a/b) the PF-ODE is solved exactly in its linear part (DPM-Solver's
  exponential-integrator form, Lu et al. 2022a),

      x_s = (b_s/b_t)·x_t + a_s·∫_0^h e^{u−h}·x̂₀(λ_t + u) du,   h = λ_s − λ_t,

  with x̂₀ replaced by its Taylor polynomial, whose derivatives come from the last three
  outputs x̂₀(t_k), x̂₀(t_{k−1}), x̂₀(t_{k−2}) (r₀ = h_{k−1}/h, r₁ = h_{k−2}/h):

      D₁ ≈ h·x̂₀',  D₂ = (D₁,₀ − D₁,₁)/(r₀ + r₁) ≈ h²·x̂₀''/2,
      x_s = (b_s/b_t)·x_t + a_s(1 − e^{−h})·x̂₀ + a_s·((e^{−h} − 1)/h + 1)·D₁
            − 2·a_s·((e^{−h} − 1 + h)/h² − ½)·D₂.

  The factor 2 on the D₂ term: the x̂₀'' term of the integral is
  a_s·∫_0^h e^{u−h}·u²/2 du·x̂₀'' = −a_s·((e^{−h} − 1 + h)/h² − ½)·h²·x̂₀'', and
  h²·x̂₀'' ≈ 2·D₂. Diffusers and the authors' code use 1, which leaves an O(h³) local
  error, a 2nd-order method: on Gaussian data (flow path, log-SNR grid, exact map) the
  max error at 16/32/64 steps is 0.015/8.9e-4/7.5e-6 with 2 and 0.027/4.2e-3/8.1e-4
  with 1 (docs/samplers.md).
  Order per step (`_order`): 1st, then 2nd at the first steps (warm-up); order ≤ the
  number of remaining steps at the end (diffusers' lower_order_final), so the last step,
  to b = 0 (λ = +∞, h = ∞), is first order and returns x̂₀; the step from a = 0 (λ = −∞)
  is first order, x_s = b_s·x_t + a_s·x̂₀, and the next steps do not difference across it
  (its h is infinite). All coefficients are written without λ where it is infinite
  (a_s(1 − e^{−h}) = a_s − a_t·b_s/b_t) and computed at trace time in float64. NFE = N."""
  del keys
  grid, a, b, log_sigma = _schedule(path, num_steps, spacing, t_start)
  cx, cm = (jnp.asarray(v, jnp.float32) for v in _dpm3m_coefficients(a, b, log_sigma))

  def step(k, carry):
    x, m1, m2 = carry
    m0, _ = denoiser(x, grid[k])
    c = cm[k].astype(x.dtype)
    return cx[k].astype(x.dtype) * x + c[0] * m0 + c[1] * m1 + c[2] * m2, m0, m1

  zeros = jnp.zeros_like(x)
  x, _, _ = jax.lax.fori_loop(0, num_steps, step, (x, zeros, zeros))
  return x, num_steps


def _unipc_b(h, p, variant):
  """UniPC's b_j = g_j(−h)·j!/B(h), j = 1..p, and B(h) (Zhao et al. 2023, with the
  data-prediction sign: hh = −h; B = e^{hh} − 1 ('bh2') or hh ('bh1'))."""
  hh = -h
  big_b = math.expm1(hh) if variant == "bh2" else hh
  return np.array([_phi(j, hh) * math.factorial(j) / big_b for j in range(1, p + 1)]), big_b


def _unipc_coefficients(a, b, log_sigma, order, variant):
  """Predictor x_{k+1} = px[k]·x^c_k + Σ_j pm[k, j]·x̂₀(t_{k−j}) (j = 0..2) and corrector
  x^c_k = cs[k]·x_k + cp[k]·x^c_{k−1} + Σ_j cm[k, j]·x̂₀(t_{k−j}) (j = 0..3); see `unipc`."""
  n = len(a) - 1
  px, pm = np.zeros(n), np.zeros((n, 3))
  cs, cp, cm = np.ones(n), np.zeros(n), np.zeros((n, 4))
  orders = [_order(log_sigma, k, n, order) for k in range(n)]
  for k in range(n):
    a_t, b_t, a_s, b_s = a[k], b[k], a[k + 1], b[k + 1]
    px[k] = b_s / b_t
    phi1 = a_s - a_t * b_s / b_t                      # a_s·(1 − e^{−h}), finite at a_t = 0
    p = orders[k]
    pm[k, 0] = phi1
    if p > 1:                                         # UniP-p, ρ from R_{p−1}
      h = log_sigma[k] - log_sigma[k + 1]
      rks = np.array([(log_sigma[k] - log_sigma[k - i]) / h for i in range(1, p)])
      if p == 2:
        rho = np.array([0.5])
      else:
        bs, _ = _unipc_b(h, p - 1, variant)
        rho = np.linalg.solve(np.vander(rks, p - 1, increasing=True).T, bs)
      _, big_b = _unipc_b(h, 1, variant)
      # − a_s·B(h)·Σ_i ρ_i·D_i,  D_i = (x̂₀(t_{k−i}) − x̂₀(t_k))/r_i
      pm[k, 1:p] += -a_s * big_b * rho / rks
      pm[k, 0] += a_s * big_b * np.sum(rho / rks)
    # UniC-p for x_{k+1}, applied at step k + 1 with that step's model output (no extra
    # NFE); none after the last step, and none after a step from a = 0 (h = ∞).
    if k + 1 < n and np.isfinite(log_sigma[k]):
      h = log_sigma[k] - log_sigma[k + 1]
      rks = np.array([(log_sigma[k] - log_sigma[k - i]) / h for i in range(1, p)] + [1.0])
      bs, big_b = _unipc_b(h, p, variant)
      rho = (np.array([0.5]) if p == 1
             else np.linalg.solve(np.vander(rks, p, increasing=True).T, bs))
      j = k + 1  # the corrector runs at loop index k + 1: x̂₀(t_{k+1}) is its column 0
      cs[j], cp[j] = 0.0, px[k]
      cm[j, 1] = phi1 + a_s * big_b * (np.sum(rho[:-1] / rks[:-1]) + rho[-1])
      cm[j, 2:p + 1] += -a_s * big_b * rho[:-1] / rks[:-1]
      cm[j, 0] = -a_s * big_b * rho[-1]
  return px, pm, cs, cp, cm


def unipc(denoiser, path, x, keys, num_steps: int, order: int = 3, variant: str = "bh2",
          spacing: str = "uniform", t_start: float = 1.0):
  """UniPC (Zhao, Bai, Rao, Zhou, Lu 2023, "UniPC: A Unified Predictor-Corrector Framework
  for Fast Sampling of Diffusion Models": the multistep UniP-p predictor and UniC-p
  corrector, data prediction; diffusers' UniPCMultistepScheduler with predict_x0=True
  is the reference formulation). In
  λ = log(a/b), h = λ_{k+1} − λ_k, r_i = (λ_{k−i} − λ_k)/h, D_i = (x̂₀(t_{k−i}) − x̂₀(t_k))/r_i:

      UniP-p:  x_{k+1} = (b_{k+1}/b_k)·x^c_k + a_{k+1}(1 − e^{−h})·x̂₀(t_k)
                         − a_{k+1}·B(h)·Σ_{i<p} ρ_i·D_i
      UniC-p:  x^c_{k+1} = the same from x^c_k with one more term, the new output
               D_p = x̂₀(x_{k+1}, t_{k+1}) − x̂₀(t_k) (r_p = 1), and ρ^c from the p×p system,

  R_p(h)·ρ = g_p(h), R_p[j, i] = r_i^j, g_j = φ_{j+1}(−h)·j!/B(h) (the paper's order
  conditions), B(h) = e^{−h} − 1 ('bh2', default) or −h ('bh1'); UniP-2 uses ρ = ½ and
  UniC-1 ρ = ½ (diffusers' simplified choices). The corrector reuses the next step's
  model evaluation and is applied after every step except the last, so NFE = N; its
  order is p + 1 for a UniP-p step. The order p per step follows diffusers: warm-up
  1, 2, … and ≤ the number of remaining steps at the end (lower_order_final), capped by
  `order` ≤ 3. a = 0 (λ = −∞, the flow path at t = 1): that step is first order,
  x = b_s·x₁ + a_s·x̂₀, it is not corrected (the corrector would integrate over an
  infinite λ interval), and later steps do not difference across it; b = 0 (λ = +∞,
  the last step) is a first-order step that returns x̂₀. Coefficients are computed at
  trace time in float64 (`_schedule`). Deterministic: `keys` are unused."""
  del keys
  if order not in (1, 2, 3):
    raise ValueError(f"unipc: order={order}: expected 1, 2 or 3")
  if variant not in ("bh1", "bh2"):
    raise ValueError(f"unipc: variant={variant!r}: expected 'bh1' or 'bh2'")
  grid, a, b, log_sigma = _schedule(path, num_steps, spacing, t_start)
  px, pm, cs, cp, cm = (jnp.asarray(v, jnp.float32)
                        for v in _unipc_coefficients(a, b, log_sigma, order, variant))

  def step(k, carry):
    x, x_prev, m1, m2, m3 = carry  # x_k (predicted), x^c_{k−1}, x̂₀ at t_{k−1..k−3}
    m0, _ = denoiser(x, grid[k])
    c, p = cm[k].astype(x.dtype), pm[k].astype(x.dtype)
    x = cs[k].astype(x.dtype) * x + cp[k].astype(x.dtype) * x_prev + (
        c[0] * m0 + c[1] * m1 + c[2] * m2 + c[3] * m3)
    x_next = px[k].astype(x.dtype) * x + p[0] * m0 + p[1] * m1 + p[2] * m2
    return x_next, x, m0, m1, m2

  zeros = jnp.zeros_like(x)
  x, *_ = jax.lax.fori_loop(0, num_steps, step, (x, zeros, zeros, zeros, zeros))
  return x, num_steps


# Adams–Bashforth coefficients on the newest-first history (PNDM's linear multistep).
_ADAMS_BASHFORTH = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _ipndm_coefficients(a, b, order):
  """x_{k+1} = c[k, 0]·x̂₀(t_k) + Σ_j c[k, 1 + j]·ε̂(t_{k−j}), j = 0..3; see `ipndm`."""
  n = len(a) - 1
  with np.errstate(divide="ignore"):
    sig = np.where(a > 0, b / np.where(a > 0, a, 1.0), np.inf)
  c = np.zeros((n, 5))
  for k in range(n):
    p = min(order, k + 1)
    while p > 1 and not _regular(sig[k - p + 1:k + 1]):
      p -= 1
    c[k, :2] = [a[k + 1], b[k + 1]]                   # Euler in σ, written as DDIM
    if p > 1:
      d = a[k + 1] * (sig[k + 1] - sig[k])
      c[k, 1:p + 1] += d * np.array(_ADAMS_BASHFORTH[p])
      c[k, 1] -= d
  return c


def ipndm(denoiser, path, x, keys, num_steps: int, order: int = 4, spacing: str = "uniform",
          t_start: float = 1.0):
  """Improved PNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
  Integrator" (DEIS), iPNDM: PNDM's linear multistep (Liu et al. 2022) with a
  lower-order multistep warm start instead of Runge–Kutta): Adams–Bashforth on the PF-ODE
  in the scaled variable y = x/a with σ = b/a, dy/dσ = ε̂ (as the `edm` sampler),

      y_{k+1} = y_k + (σ_{k+1} − σ_k)·Σ_{j<p} c^{(p)}_j·ε̂(t_{k−j}),
      c^{(1..4)} = (1), (3, −1)/2, (23, −16, 5)/12, (55, −59, 37, −9)/24,

  with p = min(order ≤ 4, k + 1): first order at the first step, one more per step.

  Each step is written as the DDIM step plus the multistep correction,
      x_{k+1} = a_{k+1}·x̂₀ + b_{k+1}·ε̂(t_k)
                + a_{k+1}(σ_{k+1} − σ_k)·(Σ_j c_j ε̂(t_{k−j}) − ε̂(t_k)),
  which equals a_{k+1}·y_{k+1} wherever a_k > 0 (Euler in σ is DDIM) and stays finite
  where a_k = 0 (the flow path at t = 1, σ = ∞). That first step is the DDIM step
  x = a_s·x̂₀ + b_s·x₁ (Euler in σ in its a → 0 limit: first order, not exact), and ε̂(1)
  is left out of the later steps' history (the warm-up restarts after it). The last
  step, to σ = 0 (b = 0, a = 1), is the same Adams–Bashforth step: σ = 0 is an ordinary
  node of dy/dσ = ε̂, and the formula is finite there.

  The coefficients are the fixed-step ones on any grid, as iPNDM uses them. They are
  exact Adams–Bashforth-p only for equal σ steps; on the usual grids (uniform t,
  karras, logsnr: far from uniform in σ) the step-ratio mismatch leaves the method 2nd
  order asymptotically (measured error slope 2.15 on Gaussian data; the lower-order
  warm-up steps cap it at 2 as well wherever ε̂ still varies there). Yet at ≤ 20 NFE it
  beat the variable-step coefficients (Lagrange integrals on the actual σ nodes, slope
  3.3 at 32 → 64 steps) in a side run on the mixture: those extrapolate over step
  ratios of 4 and more on few-step log-SNR grids. Deterministic: `keys` are unused.
  NFE = N."""
  del keys
  if order not in (1, 2, 3, 4):
    raise ValueError(f"ipndm: order={order}: expected 1, 2, 3 or 4")
  grid, a, b, _ = _schedule(path, num_steps, spacing, t_start)
  coef = jnp.asarray(_ipndm_coefficients(a, b, order), jnp.float32)

  def step(k, carry):
    x, e1, e2, e3 = carry
    x0, e0 = denoiser(x, grid[k])
    c = coef[k].astype(x.dtype)
    return c[0] * x0 + c[1] * e0 + c[2] * e1 + c[3] * e2 + c[4] * e3, e0, e1, e2

  zeros = jnp.zeros_like(x)
  x, *_ = jax.lax.fori_loop(0, num_steps, step, (x, zeros, zeros, zeros))
  return x, num_steps


def consistency(denoiser, path, x, keys, num_steps: int, spacing: str = "uniform",
                t_start: float = 1.0):
  """Multistep consistency sampling (Song, Dhariwal, Chen, Sutskever 2023, "Consistency
  Models", Alg. 1), on any path. The denoiser is a consistency model's x̂₀ = f_θ(x_t, t)
  (its ε̂ is unused). On the grid t_0 = 1 > … > t_N = 0:

      x̂₀ = f_θ(x, t_k);  x = a(t_{k+1})·x̂₀ + b(t_{k+1})·z_k   (k < N − 1),

  with fresh per-example noise z_k, and the sample is the last x̂₀ = f_θ(x, t_{N−1}):
  no noise is added at the end and t_N = 0 is never evaluated. (Alg. 1's
  x̂₀ + sqrt(τ² − ε²)·z is this step on the VE path with its offset ε.) num_steps = 1
  is one-step generation, x̂₀ = f_θ(x₁, 1). The update is DDIM's with its noise at the
  maximum, σ = b_s (no ε̂ term): fed a posterior-mean denoiser instead of a consistency
  function it re-noises a mean and under-disperses. a = 0 needs no care (x̂₀ is
  evaluated, never divided by a), nor b = 0 (t_N is never evaluated). NFE = N."""
  grid = spacing_lib.grid(path, num_steps, spacing, t_start)

  def step(k, x):
    x0, _ = denoiser(x, grid[k])
    a_s, b_s = path.ab(grid[k + 1])
    return a_s * x0 + b_s * _noise(keys, k, x)

  x = jax.lax.fori_loop(0, num_steps - 1, step, x)
  return denoiser(x, grid[num_steps - 1])[0], num_steps
