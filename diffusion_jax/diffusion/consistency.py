"""The mathematics of consistency models (Song, Dhariwal, Chen & Sutskever 2023,
"Consistency Models"; Song & Dhariwal 2023, "Improved Techniques for Training
Consistency Models"), on any Gaussian path x_t = a(t)·x + b(t)·z, in plain jax.numpy.

A consistency function maps every point of a probability-flow ODE trajectory to the
trajectory's point at t_min: f(x_t, t) = x_{t_min}. It is parametrised so that the
boundary condition f(x, t_min) = x holds by construction (CM §3, Appendix C):

    f_θ(x_t, t) = c_skip(t)·x_t + c_out(t)·D_θ(x_t, t),
    c_skip = σ_d² / ((σ − σ_min)² + σ_d²),   c_out = (σ − σ_min) / sqrt((σ − σ_min)² + σ_d²),

with σ = b/a the path's noise level, σ_min = σ(t_min), σ_d the data's standard deviation
and D_θ the network's own x̂₀ (through its prediction type, `predictions.to_x0_eps`), in
data units, so c_out → 1 at high noise and a student initialised from a diffusion
teacher starts as the teacher's one-step denoiser x̂₀. Written with
Δ = b_t·a_min − b_min·a_t = a_t·a_min·(σ − σ_min) and s = a_t·a_min,

    c_skip = σ_d²·s² / (Δ² + σ_d²·s²),   c_out = Δ / sqrt(Δ² + σ_d²·s²),

which is finite where a = 0 (the flow path's t = 1: c_skip = 0, c_out = 1). At
t ≤ t_min, Δ is set to 0 (the two products are equal at t = t_min, but a fused
multiply-add would leave the rounding error of one of them, and below t_min f is the
identity), so c_skip = 1 and c_out = 0 exactly and f(x, t_min) = x bitwise.

The losses (`loss`) compare f at adjacent times t_n < t_{n+1} of a discretisation:
consistency distillation (CD, CM Alg. 2) steps the teacher's PF-ODE from t_{n+1} to
t_n (`ode_step`); consistency training (CT, CM Alg. 3) uses x_{t_n} = a_n·x + b_n·z with
the same z (an unbiased estimator of the same objective as N → ∞). The CT
discretisation schedules N(k) (`num_scales`) and target EMA μ(k) (`target_decay`), the
distances (`distance`) and iCT's weighting and noise distribution over the grid
(`ict_weight`, `lognormal_pair_probs`) are here; the grid itself (EDM's ρ-spacing in σ,
mapped to times) is `samplers.spacing`'s, assembled by the consistency task.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SOLVERS = ("heun", "euler")
SCHEDULES = ("fixed", "cm", "ict")
DISTANCES = ("l2", "l1", "pseudo_huber", "lpips")


def _bcast(v, x):
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def scalings(path, t, t_min: float, sigma_data: float):
  """(c_skip(t), c_out(t)) of the boundary parametrisation (module docstring), t of any
  shape; exactly (1, 0) at t ≤ t_min and (0, 1) where a(t) = 0."""
  t = jnp.asarray(t, jnp.float32)
  a, b = path.ab(t)
  a_min, b_min = path.ab(jnp.full_like(t, t_min))
  delta = jnp.where(t <= jnp.float32(t_min), 0.0, b * a_min - b_min * a)
  s2 = sigma_data ** 2 * (a * a_min) ** 2
  denom = delta ** 2 + s2
  return s2 / denom, delta / jnp.sqrt(denom)


def parametrize(path, x_t, x0, t, t_min: float, sigma_data: float):
  """f = c_skip(t)·x_t + c_out(t)·x̂₀ for x_t, x̂₀ [B, ...] and t scalar or [B]. At
  t ≤ t_min the formula gives 1·x_t + 0·x̂₀ = x_t exactly; x_t is also selected there
  outright, so that no compiler rewriting of the division (a reciprocal) can move it."""
  c_skip, c_out = scalings(path, t, t_min, sigma_data)
  f = _bcast(c_skip, x_t) * x_t + _bcast(c_out, x_t) * x0
  at_min = _bcast(jnp.asarray(t, jnp.float32) <= jnp.float32(t_min), x_t)
  return jnp.where(at_min, x_t, f)


def boundary(denoiser, path, t_min: float, sigma_data: float):
  """The denoiser (x_t, t) -> (x̂₀, ε̂) of a consistency model whose network is
  `denoiser`: x̂₀' = f = c_skip·x_t + c_out·x̂₀ and ε̂' = (x_t − a·x̂₀')/b (ε̂ kept where
  b = 0), what `samplers.consistency` (CM Alg. 1) evaluates."""
  def wrapped(x_t, t):
    x0, eps = denoiser(x_t, t)
    f = parametrize(path, x_t, x0, t, t_min, sigma_data)
    a, b = (_bcast(v, x_t) for v in path.ab(t))
    eps_f = jnp.where(b > 0, (x_t - a * f) / jnp.where(b > 0, b, 1.0), eps)
    return f, eps_f
  return wrapped


def ode_step(path, denoise, x_t, t, s, solver: str = "heun"):
  """One step of the probability-flow ODE from t to s < t (t, s [B], s < 1) with
  denoise(x, t [B]) -> (x̂₀, ε̂): in y = x/a and σ = b/a the PF-ODE is dy/dσ = ε̂
  (Karras et al. 2022, eq. 4 with s(t) = 1), whose Euler step is DDIM's

      x_s = a_s·x̂₀ + b_s·ε̂                                   ('euler', CM's Euler solver)

  and whose Heun step (EDM Alg. 1; CM's choice) adds the trapezoid correction

      x_s += a_s·(σ_s − σ_t)·(ε̂(x_s, s) − ε̂(x_t, t))/2         ('heun'),

  dropped where a_t = 0 (σ_t = ∞: the flow path's t = 1), where the Euler step is the
  exact finite one. One (euler) or two (heun) denoiser calls."""
  if solver not in SOLVERS:
    raise ValueError(f"config.consistency.solver={solver!r}: expected one of {SOLVERS}")
  x0, eps = denoise(x_t, t)
  a_s, b_s = (_bcast(v, x_t) for v in path.ab(s))
  x_s = a_s * x0 + b_s * eps
  if solver == "euler":
    return x_s
  _, eps_s = denoise(x_s, s)
  a_t, b_t = (_bcast(v, x_t) for v in path.ab(t))
  sigma_t = b_t / jnp.where(a_t > 0, a_t, 1.0)
  corr = a_s * (b_s / a_s - sigma_t) * 0.5 * (eps_s - eps)
  return x_s + jnp.where(a_t > 0, corr, 0.0)


def loss(student, target, x, z, t_lo, t_hi, path, *, teacher=None, solver: str = "heun",
         distance, weight=None):
  """The consistency loss E[λ·d(f_θ(x_{t_{n+1}}, t_{n+1}), f_θ⁻(x̂_{t_n}, t_n))] over a
  batch, t_lo = t_n < t_hi = t_{n+1} [B]:

      x_{t_{n+1}} = a_{n+1}·x + b_{n+1}·z;
      x̂_{t_n} = ode_step(teacher, x_{t_{n+1}}: t_{n+1} → t_n)     (CD, CM Alg. 2), or
      x̂_{t_n} = a_n·x + b_n·z, the same z                          (CT, CM Alg. 3),

  student(x_t, t [B]) -> f_θ and target(x_t, t) -> f_θ⁻ (stop-gradient applied here),
  teacher(x_t, t) -> (x̂₀, ε̂) or None (CT), distance(f, g) -> [B] (`distance`),
  weight λ [B] (None: 1). Returns (the scalar loss, the per-example distances [B])."""
  a_hi, b_hi = (_bcast(v, x) for v in path.ab(t_hi))
  x_hi = a_hi * x + b_hi * z
  if teacher is None:
    a_lo, b_lo = (_bcast(v, x) for v in path.ab(t_lo))
    x_lo = a_lo * x + b_lo * z
  else:
    x_lo = ode_step(path, teacher, x_hi, t_hi, t_lo, solver)
  f_target = jax.lax.stop_gradient(target(jax.lax.stop_gradient(x_lo), t_lo))
  d = distance(student(x_hi, t_hi), f_target)
  w = jnp.ones_like(d) if weight is None else weight
  return jnp.mean(w * d), d


def pseudo_huber_c(dim: int) -> float:
  """iCT's c = 0.00054·sqrt(d) for data of d dimensions (Song & Dhariwal 2023, §3.3)."""
  return 0.00054 * math.sqrt(dim)


def distance(kind: str, c: float | None = None):
  """d(x, y) -> [B] over examples [B, ...]: 'l2' mean squared and 'l1' mean absolute
  difference (CM's), 'pseudo_huber' sqrt(‖x − y‖² + c²) − c over all dimensions (iCT
  §3.3; c None: `pseudo_huber_c`). 'lpips' needs a network: the task builds it."""
  def flat(v):
    return v.reshape(v.shape[0], -1).astype(jnp.float32)

  if kind == "l2":
    return lambda x, y: jnp.mean(jnp.square(flat(x) - flat(y)), axis=1)
  if kind == "l1":
    return lambda x, y: jnp.mean(jnp.abs(flat(x) - flat(y)), axis=1)
  if kind == "pseudo_huber":
    def huber(x, y):
      cc = pseudo_huber_c(flat(x).shape[1]) if c is None else c
      return jnp.sqrt(jnp.sum(jnp.square(flat(x) - flat(y)), axis=1) + cc ** 2) - cc
    return huber
  raise ValueError(f"config.consistency.distance={kind!r}: expected one of {DISTANCES} "
                   "('lpips' through the task)")


def _check_schedule(schedule, s0, s1):
  if schedule not in SCHEDULES:
    raise ValueError(f"config.consistency.schedule={schedule!r}: expected one of {SCHEDULES}")
  if schedule != "fixed" and not 1 <= s0 <= s1:
    raise ValueError(f"config.consistency.s0={s0}, s1={s1}: need 1 <= s0 <= s1")


def ict_period(total: int, s0: int, s1: int) -> int:
  """K' = ⌊K / (⌊log₂⌊s1/s0⌋⌋ + 1)⌋, the steps between doublings of iCT's N(k)."""
  return max(total // (int(math.floor(math.log2(s1 // s0))) + 1), 1)


def num_scales(schedule: str, k, total: int, s0: int, s1: int, fixed: int = 0):
  """N(k), the number of grid points at training step k of `total` (K):

    fixed  N                                                   (CD; CT with a fixed N)
    cm     ⌈sqrt(k/K·((s1 + 1)² − s0²) + s0²) − 1⌉ + 1        (CM Appendix C, eq. for N(k))
    ict    min(s0·2^⌊k/K'⌋, s1) + 1,  K' = `ict_period`        (iCT §3.4, exponential)

  k may be traced (int32 result); in numpy for concrete k."""
  _check_schedule(schedule, s0, s1)
  if schedule == "fixed":
    return jnp.full(jnp.shape(k), fixed, jnp.int32)
  k = jnp.asarray(k)
  if schedule == "cm":
    u = k.astype(jnp.float32) / total
    n = jnp.ceil(jnp.sqrt(u * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1) + 1
    return jnp.clip(n, s0, s1 + 1).astype(jnp.int32)
  doublings = jnp.minimum(k.astype(jnp.int32) // ict_period(total, s0, s1), _doublings(s0, s1))
  return jnp.minimum(s0 * jnp.left_shift(1, doublings), s1).astype(jnp.int32) + 1


def _doublings(s0: int, s1: int) -> int:
  """The first j with s0·2^j ≥ s1 (iCT's N stops growing there)."""
  j = 0
  while s0 << j < s1:
    j += 1
  return j


def scale_values(schedule: str, s0: int, s1: int, fixed: int = 0) -> np.ndarray:
  """Every value `num_scales` can take, ascending (int [R]): the rows of a task's table of
  grids, row = searchsorted(values, N(k))."""
  _check_schedule(schedule, s0, s1)
  if schedule == "fixed":
    return np.array([fixed])
  if schedule == "cm":
    return np.arange(s0, s1 + 2)
  return np.array(sorted({min(s0 << j, s1) + 1 for j in range(_doublings(s0, s1) + 1)}))


def target_decay(schedule: str, mu: float, n, s0: int):
  """μ(k) of the target network: CM's μ(k) = exp(s0·log μ₀ / N(k)) for the 'cm'
  schedule (CM Appendix C), the constant μ otherwise (0 = iCT's θ⁻ = stopgrad(θ))."""
  n = jnp.asarray(n, jnp.float32)
  if schedule == "cm" and mu > 0:
    return jnp.exp(s0 * math.log(mu) / n)
  return jnp.full(n.shape, mu, jnp.float32)


def ict_weight(sigma_lo, sigma_hi):
  """iCT's λ(σ_n) = 1/(σ_{n+1} − σ_n) (Song & Dhariwal 2023, §3.1)."""
  return 1.0 / (sigma_hi - sigma_lo)


def lognormal_pair_probs(sigmas, mean: float = -1.1, std: float = 2.0) -> np.ndarray:
  """iCT's discrete lognormal over the pairs (σ_n, σ_{n+1}) of an ascending grid σ [N]
  (§3.5): p(n) ∝ erf((log σ_{n+1} − P_mean)/(√2·P_std)) − erf((log σ_n − P_mean)/(√2·P_std)),
  float64 [N − 1], summing to 1."""
  s = np.asarray(sigmas, np.float64)
  if not np.all(s > 0):
    raise ValueError(f"lognormal_pair_probs: the grid's σ must be > 0, got {s.tolist()}")
  e = np.array([math.erf((math.log(v) - mean) / (math.sqrt(2.0) * std)) for v in s])
  p = np.maximum(e[1:] - e[:-1], 0.0)
  if not p.sum() > 0:
    raise ValueError("lognormal_pair_probs: the grid has no mass under the lognormal")
  return p / p.sum()
