"""Time-step spacings: a decreasing grid t_0 = 1 > t_1 > ... > t_N = 0 (t_0 = t_start < 1
for SDEdit, which starts from a partly noised image).

  uniform  t_i = 1 − i/N (the samplers' default, `solvers.time_grid`).
  karras   EDM (Karras et al. 2022, eq. 5) in σ = b/a:
             σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ,  i < N,  ρ = 7,
           mapped back through t = σ⁻¹(σ_i) (flow: σ = t/(1−t), t = σ/(1+σ)).
  logsnr   uniform in λ = log(a²/b²) = −2·log σ between the same end points (DPM-Solver's
           choice, Lu et al. 2022).

σ_max = min(σ(1), sigma_max) and σ_min = max(σ(t_min), sigma_min), where t_min is the
first positive time of a discrete path (0⁺ otherwise: the ve/edm paths' σ jumps
from 0 to their σ_min at t = 0); σ(1) is infinite for the flow
path, so t_0 is always set to exactly 1 and t_N to exactly 0. The grid is a static
(trace-time) computation: σ is inverted by bisection in float64, σ(t) being increasing
for every Gaussian path. On a discrete path the grid is snapped to the path's steps and
kept strictly decreasing (snapping would otherwise merge steps near t = 0).

An explicit grid, as diffusers' pipelines accept custom timesteps or sigmas, is a
sequence t_0 = t_start > t_1 > ... > t_N = 0 passed as `spacing` (`explicit`): it is
validated up front (length num_steps + 1, strictly decreasing, in [0, 1], t_0 = t_start
and t_N = 0 within 1e-6; on a discrete path each time is snapped to the path's grid i/T
and duplicates after snapping are refused) and used as given.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ("uniform", "karras", "logsnr")


def _check(path, num_steps, t_start):
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  if not 0.0 < t_start <= 1.0:
    raise ValueError(f"t_start={t_start} must be in (0, 1]")
  if path.discrete and num_steps > round(t_start * path.num_steps):
    raise ValueError(f"num_steps={num_steps} exceeds the path's "
                     f"{round(t_start * path.num_steps)} discrete steps below t={t_start}")


def uniform(path, num_steps: int, t_start: float = 1.0):
  """t_0 = t_start > t_1 > ... > t_N = 0, uniform in t (snapped to a discrete path's grid)."""
  _check(path, num_steps, t_start)
  return path.snap(jnp.linspace(t_start, 0.0, num_steps + 1))


def sigma(path, t) -> np.ndarray:
  """σ(t) = b(t)/a(t) as float64 numpy, evaluated at trace time (inf where a = 0)."""
  with jax.ensure_compile_time_eval():
    a, b = path.ab(jnp.asarray(t, jnp.float32))
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  with np.errstate(divide="ignore"):
    return np.where(a > 0, b / np.where(a > 0, a, 1.0), np.inf)


def inverse_sigma(path, sig) -> np.ndarray:
  """t with σ(t) = sig (float64 [n]), by 40 steps of bisection on [0, 1]."""
  sig = np.asarray(sig, np.float64)
  lo, hi = np.zeros_like(sig), np.ones_like(sig)
  for _ in range(40):
    mid = 0.5 * (lo + hi)
    above = sigma(path, mid) > sig
    hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
  return 0.5 * (lo + hi)


def sigma_range(path, sigma_min: float = 0.002, sigma_max: float = 80.0, t_start: float = 1.0):
  """(σ_min, σ_max) the non-uniform spacings span (see the module docstring)."""
  # σ(0⁺), not σ(0) = 0: the ve/edm paths jump from b = 0 at t = 0 to b = σ_min of the
  # path (0.01) just above it, and a grid below that would repeat σ = σ_min.
  t_min = 1.0 / path.num_steps if path.discrete else 1e-7
  return (max(float(sigma(path, t_min)), sigma_min),
          min(float(sigma(path, t_start)), sigma_max))


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0):
  """EDM eq. 5: σ_0 = σ_max > ... > σ_{N−1} = σ_min (float64 [N]; σ_N = 0 is implied)."""
  u = np.arange(num_steps) / max(num_steps - 1, 1)
  return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _from_sigmas(path, sigmas, t_start):
  """t_i = σ⁻¹(σ_i) for i < N, then t_0 := t_start, t_N := 0; snapped and kept strict."""
  n = len(sigmas)
  t = np.concatenate([inverse_sigma(path, sigmas), [0.0]])
  t[0] = t_start
  if path.discrete:
    k = np.round(t * path.num_steps).astype(np.int64)
    for i in range(1, n + 1):        # strictly decreasing from the top ...
      k[i] = min(k[i], k[i - 1] - 1)
    k[n] = 0
    for i in range(n - 1, -1, -1):   # ... and room for the remaining steps at the bottom
      k[i] = max(k[i], k[i + 1] + 1)
    t = k / path.num_steps
  return jnp.asarray(t, jnp.float32)


def karras(path, num_steps: int, rho: float = 7.0, sigma_min: float = 0.002,
           sigma_max: float = 80.0, t_start: float = 1.0):
  """EDM's ρ-spacing in σ = b/a (Karras et al. 2022, eq. 5), as times t_0..t_N."""
  _check(path, num_steps, t_start)
  rng = sigma_range(path, sigma_min, sigma_max, t_start)
  return _from_sigmas(path, karras_sigmas(num_steps, *rng, rho), t_start)


def logsnr(path, num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
           t_start: float = 1.0):
  """Uniform in log-SNR λ = log(a²/b²) (Lu et al. 2022), as times t_0..t_N."""
  _check(path, num_steps, t_start)
  lo, hi = sigma_range(path, sigma_min, sigma_max, t_start)
  return _from_sigmas(path, np.exp(np.linspace(np.log(hi), np.log(lo), num_steps)), t_start)


def explicit(path, times, num_steps: int, t_start: float = 1.0):
  """A user-given grid t_0 = t_start > ... > t_N = 0 as float32 times, after checking it
  (ValueError naming the problem). On a discrete path each time is snapped to i/T."""
  _check(path, num_steps, t_start)
  try:
    t = np.asarray(times, np.float64)
  except jax.errors.TracerArrayConversionError as e:
    raise ValueError("an explicit time grid must be concrete (a list, tuple or array "
                     "known at trace time), not a traced value") from e
  except (TypeError, ValueError) as e:
    raise ValueError(f"explicit time grid {times!r}: not a sequence of numbers") from e
  where = "explicit time grid (spacing=<times> or config.sample.times)"
  if t.ndim != 1:
    raise ValueError(f"{where}: expected a 1-D sequence of times, got shape {t.shape}")
  if len(t) != num_steps + 1:
    raise ValueError(f"{where}: {len(t)} times t_0..t_N make {len(t) - 1} steps, but "
                     f"num_steps={num_steps}: the length must be num_steps + 1")
  if not np.all(np.isfinite(t)) or np.any(t < 0.0) or np.any(t > 1.0):
    raise ValueError(f"{where}: all times must be in [0, 1], got {t.tolist()}")
  if np.any(np.diff(t) >= 0):
    i = int(np.argmax(np.diff(t) >= 0))
    raise ValueError(f"{where}: times must be strictly decreasing, but t_{i}={t[i]} <= "
                     f"t_{i + 1}={t[i + 1]}")
  if abs(t[0] - t_start) > 1e-6:
    raise ValueError(f"{where}: t_0={t[0]} must equal t_start={t_start} (1 unless SDEdit)")
  if abs(t[-1]) > 1e-6:
    raise ValueError(f"{where}: the last time t_N={t[-1]} must be 0")
  if path.discrete:
    k = np.round(t * path.num_steps).astype(np.int64)
    if np.any(np.diff(k) >= 0):
      i = int(np.argmax(np.diff(k) >= 0))
      raise ValueError(f"{where}: t_{i}={t[i]} and t_{i + 1}={t[i + 1]} snap to the same "
                       f"step {k[i]}/{path.num_steps} of the discrete path")
    t = k / path.num_steps
  else:
    t[0], t[-1] = t_start, 0.0
  return jnp.asarray(t, jnp.float32)


def grid(path, num_steps: int, spacing="uniform", t_start: float = 1.0):
  """The time grid from t_start (< 1: SDEdit's t₀) down to 0: of a spacing by name, or an
  explicit sequence of times (`explicit`)."""
  fns = {"uniform": uniform, "karras": karras, "logsnr": logsnr}
  if not isinstance(spacing, str):
    return explicit(path, spacing, num_steps, t_start)
  if spacing not in fns:
    raise ValueError(f"spacing={spacing!r}: expected one of {SPACINGS} or a sequence of times")
  return fns[spacing](path, num_steps, t_start=t_start)
