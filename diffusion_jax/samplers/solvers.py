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

import jax
import jax.numpy as jnp

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
