"""What the network predicts, and exact conversions between predictions.

The network predicts the target c(t)·x + d(t)·z (seed 000: "generalized diffusion"):

  prediction   c(t)      d(t)
  ---------    -------   -------
  eps          0         1          (DDPM ε-prediction)
  x            1         0          (x₀-prediction)
  velocity     a'(t)     b'(t)      (dx_t/dt; rectified flow: z − x)
  v            −b(t)     a(t)       (Salimans & Ho v-prediction, VP paths)

Given x_t = a·x + b·z and p = c·x + d·z, the pair (x, z) solves a 2×2 linear system,
so every prediction converts exactly to x̂₀ and ε̂ (and so to score −ε̂/b and velocity
a'·x̂₀ + b'·ε̂) wherever a·d − b·c ≠ 0.
"""
from __future__ import annotations

import jax.numpy as jnp

PREDICTIONS = ("eps", "x", "velocity", "v")


def coefficients(path, prediction: str, t):
  """(c(t), d(t)) of the prediction target."""
  a, b = path.ab(t)
  if prediction == "eps":
    return jnp.zeros_like(a), jnp.ones_like(b)
  if prediction == "x":
    return jnp.ones_like(a), jnp.zeros_like(b)
  if prediction == "velocity":
    return path.ab_dot(t)
  if prediction == "v":
    return -b, a
  raise ValueError(f"diffusion.prediction={prediction!r}: expected one of {PREDICTIONS}")


def _bcast(coef, x):
  """[B] per-example coefficient → broadcastable against x [B, ...]."""
  coef = jnp.asarray(coef, x.dtype)
  return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def target(path, prediction: str, x0, z, t):
  """c(t)·x₀ + d(t)·z for x0, z [B, ...] and t [B]."""
  c, d = coefficients(path, prediction, t)
  return _bcast(c, x0) * x0 + _bcast(d, z) * z


def to_x0_eps(path, prediction: str, pred, x_t, t):
  """(x̂₀, ε̂) from a prediction: solve [a b; c d]·[x; z] = [x_t; p] by Cramer's rule."""
  a, b = path.ab(t)
  c, d = coefficients(path, prediction, t)
  a, b, c, d = (_bcast(v, x_t) for v in (a, b, c, d))
  det = a * d - b * c
  x0 = (d * x_t - b * pred) / det
  eps = (a * pred - c * x_t) / det
  return x0, eps


def velocity(path, x0, eps, t):
  """dx_t/dt = a'(t)·x̂₀ + b'(t)·ε̂ (the probability-flow ODE drift in t)."""
  da, db = path.ab_dot(t)
  return _bcast(da, x0) * x0 + _bcast(db, eps) * eps
