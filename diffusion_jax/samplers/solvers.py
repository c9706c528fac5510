"""Samplers: each integrates from t = 1 (noise) to t = 0 (data) with one compiled loop.

All take (denoiser, path, x_init, keys, num_steps, ...) and return (x₀ sample, NFE).
`keys` holds one PRNG key per example [B]: a sample's trajectory depends only on its
own key, so results do not change with batch size, padding or device count.
They loop with `lax.fori_loop`, so compile time does not grow with num_steps and one
compile serves any batch of the same shape. They work for every path and prediction
type because they see only the denoiser's (x̂₀, ε̂) and the path's (a, b).

For s < t the forward transition of a Gaussian path is
    q(x_t | x_s) = N(a_{t|s}·x_s, σ²_{t|s}),  a_{t|s} = a_t/a_s,  σ²_{t|s} = b_t² − a_{t|s}²·b_s²
and its posterior (seed 002 and 004, DDPM's q(x_{t−1} | x_t, x_0); VDM appendix A) is
    q(x_s | x_t, x₀) = N(μ, σ̃²),
    μ = a_{t|s}·b_s²/b_t² · x_t + a_s·σ²_{t|s}/b_t² · x₀,   σ̃² = σ²_{t|s}·b_s²/b_t².
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import predictions


def time_grid(path, num_steps: int):
  """t_0 = 1 > t_1 > ... > t_N = 0, uniform in t (snapped to a discrete path's grid)."""
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be >= 1")
  if path.discrete and num_steps > path.num_steps:
    raise ValueError(f"num_steps={num_steps} exceeds the path's {path.num_steps} "
                     "discrete steps")
  return path.snap(jnp.linspace(1.0, 0.0, num_steps + 1))


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


def euler(denoiser, path, x, keys, num_steps: int):
  """Euler on the probability-flow ODE dx/dt = a'(t)·x̂₀ + b'(t)·ε̂ (rectified flow's
  sampler when the network predicts velocity). Deterministic: `keys` are unused."""
  del keys
  grid = time_grid(path, num_steps)

  def step(k, x):
    t, s = grid[k], grid[k + 1]
    x0, eps = denoiser(x, t)
    v = predictions.velocity(path, x0, eps, jnp.full((x.shape[0],), t))
    return x + (s - t) * v

  return jax.lax.fori_loop(0, num_steps, step, x), num_steps


def ddpm(denoiser, path, x, keys, num_steps: int, variance: str = "small"):
  """DDPM ancestral sampling (Ho et al. 2020, Alg. 2), generalised to any path and
  any sub-grid: x_s ~ N(μ(x_t, x̂₀), σ²) with σ² = σ̃² ('small', the posterior
  variance β̃_t) or σ²_{t|s} ('large', β_t). No noise is added on the last step."""
  if variance not in ("small", "large"):
    raise ValueError(f"variance={variance!r}: expected 'small' or 'large'")
  grid = time_grid(path, num_steps)

  def step(k, x):
    t, s = grid[k], grid[k + 1]
    x0, _ = denoiser(x, t)
    _, b_t, a_s, b_s, a_ts, var_ts = _transition(path, t, s)
    mean = a_ts * b_s ** 2 / b_t ** 2 * x + a_s * var_ts / b_t ** 2 * x0
    var = var_ts * b_s ** 2 / b_t ** 2 if variance == "small" else var_ts
    noise = _noise(keys, k, x)
    return mean + jnp.where(s > 0, jnp.sqrt(var), 0.0) * noise

  return jax.lax.fori_loop(0, num_steps, step, x), num_steps


def ddim(denoiser, path, x, keys, num_steps: int, eta: float = 0.0):
  """DDIM (Song et al. 2021, eq. 12): x_s = a_s·x̂₀ + sqrt(b_s² − σ²)·ε̂ + σ·z with
  σ = η·σ̃. η = 0 is deterministic; η = 1 is ancestral sampling with σ̃²."""
  grid = time_grid(path, num_steps)

  def step(k, x):
    t, s = grid[k], grid[k + 1]
    x0, eps = denoiser(x, t)
    _, b_t, a_s, b_s, _, var_ts = _transition(path, t, s)
    var = eta ** 2 * var_ts * b_s ** 2 / b_t ** 2
    noise = _noise(keys, k, x)
    return a_s * x0 + jnp.sqrt(jnp.maximum(b_s ** 2 - var, 0.0)) * eps + jnp.sqrt(var) * noise

  return jax.lax.fori_loop(0, num_steps, step, x), num_steps
