"""What the network predicts, and exact conversions between predictions.

The network predicts the target c(t)·x + d(t)·z (a linear combination of data and noise, as in Kingma et al. 2021 and Salimans & Ho 2022):

  prediction   c(t)      d(t)
  ---------    -------   -------
  eps          0         1          (DDPM ε-prediction)
  x            1         0          (x₀-prediction)
  velocity     a'(t)     b'(t)      (dx_t/dt; rectified flow: z − x)
  v            −b(t)     a(t)       (Salimans & Ho v-prediction, VP paths)
  score        0         −1/b(t)    (∇ log p_t(x_t | x); NCSN / score SDEs)
  edm          σ/(σ_d·r) −σ_d/r     (EDM's F_θ, with σ = b/a, r = sqrt(σ² + σ_d²):
                                      x̂₀ = c_skip·x_t/a + c_out·F, Karras et al. 2022)

Given x_t = a·x + b·z and p = c·x + d·z, the pair (x, z) solves a 2×2 linear system,
so every prediction converts exactly to x̂₀ and ε̂ (and so to score −ε̂/b and velocity
a'·x̂₀ + b'·ε̂) wherever a·d − b·c ≠ 0.
"""
from __future__ import annotations

import jax.numpy as jnp

PREDICTIONS = ("eps", "x", "velocity", "v", "score", "edm")


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
  if prediction == "score":
    return jnp.zeros_like(a), -1.0 / b
  if prediction == "edm":
    sigma, sd = b / a, path.sigma_data
    r = jnp.sqrt(sigma ** 2 + sd ** 2)
    return sigma / (sd * r), -sd / r
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


def input_scale(path, prediction: str, t):
  """Factor applied to x_t before the network: EDM's c_in/a = 1/(a·sqrt(σ² + σ_d²)) for
  prediction='edm' (unit-variance network inputs), 1 otherwise."""
  if prediction != "edm":
    return jnp.ones_like(jnp.asarray(t, jnp.float32))
  a, b = path.ab(t)
  return 1.0 / (a * jnp.sqrt((b / a) ** 2 + path.sigma_data ** 2))


LOSS_WEIGHTS = ("uniform", "snr", "min_snr", "edm", "vlb")


def loss_weight(cfg, path, t):
  """Per-example weight w(t) of ‖f_θ − target‖² (cfg is config.diffusion).

  'uniform' weights the target's MSE by 1 (L_simple for ε; rectified flow for
  velocity). The others are defined in x̂₀ space, w_x(t)·‖x̂₀ − x₀‖², and converted
  to the target's space with ‖p − p*‖² = (det/b)²·‖x̂₀ − x₀‖², det = a·d − b·c:
    snr      w_x = SNR(t) = a²/b²                 (= ε-MSE; = NCSN's λ(σ)=σ² on scores)
    min_snr  w_x = min(SNR(t), γ)                 (Hang et al. 2023)
    edm      w_x = (σ² + σ_d²)/(σ·σ_d)²            (Karras et al. 2022, σ = b/a)
    vlb      w_x = ½(SNR(t − 1/T) − SNR(t))        (DDPM's L_{t−1} per dimension; VDM eq. 13);
             ½·SNR(1/T) at t = 1/T                 (L_0 with a Gaussian decoder)
  """
  kind = cfg.loss_weight
  if kind == "uniform":
    return jnp.ones_like(t)
  a, b = path.ab(t)
  c, d = coefficients(path, cfg.prediction, t)
  to_target = (b / (a * d - b * c)) ** 2
  snr = a ** 2 / b ** 2
  if kind == "snr":
    w = snr
  elif kind == "min_snr":
    w = jnp.minimum(snr, cfg.min_snr_gamma)
  elif kind == "edm":
    sigma = b / a
    w = (sigma ** 2 + path.sigma_data ** 2) / (sigma * path.sigma_data) ** 2
  elif kind == "vlb":
    if not path.discrete:
      raise ValueError("diffusion.loss_weight='vlb' needs diffusion.path='vp_discrete'")
    # At t = 1/T the term is L_0, the decoder: with a Gaussian decoder of variance
    # 1/SNR(t) (VDM's continuous stand-in for DDPM's discretised one), ½·SNR(t).
    # SNR(0) = ∞ would otherwise make the first step's weight infinite.
    first = t <= 1.0 / path.num_steps + 1e-6
    snr_prev = path.snr(jnp.where(first, t, t - 1.0 / path.num_steps))
    w = jnp.where(first, 0.5 * snr, 0.5 * (snr_prev - snr))
  else:
    raise ValueError(f"diffusion.loss_weight={kind!r}: expected one of {LOSS_WEIGHTS}")
  return w * to_target
