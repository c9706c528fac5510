"""Variational-autoencoder losses: the reparameterised sample, the Gaussian KL, the
decoder likelihoods, the evidence lower bound and the importance-weighted bound
(plain jax.numpy).

A VAE (Kingma & Welling 2014; Rezende et al. 2014) has a prior p(z) = N(0, I), a decoder
p_θ(x | z) and an encoder q_φ(z | x) = N(μ_φ(x), diag σ²_φ(x)). For every x,

    log p(x) ≥ ELBO(x) = E_q[log p_θ(x | z)] − KL(q_φ(z | x) ‖ p(z))         (K&W 2014, eq. 3)

with z = μ + σ ⊙ ε, ε ~ N(0, I) (the reparameterisation, K&W 2014 §2.4) so that the
gradient of the expectation is an expectation of gradients, and the KL of two Gaussians
in closed form (K&W 2014, Appendix B). The importance-weighted bound (Burda et al. 2016,
eq. 8) with K samples z_k ~ q(z | x) and weights w_k = p(x, z_k) / q(z_k | x),

    L_K(x) = E[log (1/K) Σ_k w_k],    ELBO = L_1 ≤ L_K ≤ L_{K+1} ≤ log p(x),

tends to log p(x) as K → ∞ (Burda et al. 2016, Theorem 1).

Shapes: the first axis of x and of every per-example parameter is the batch B; each
log-probability sums over all the other axes and returns [B] (nats, float32).
Decoder likelihoods (x in the data's [−1, 1] scale, 8-bit images x = n/127.5 − 1):

    gaussian_log_prob               N(x; μ, e^{2 log σ}) per element (a density)
    bernoulli_log_prob              x₀₁ log σ(l) + (1 − x₀₁) log σ(−l), x₀₁ ∈ {0, 1}
    discretized_logistic_log_prob   the mass of x's 8-bit bin under a logistic (Salimans
                                    et al. 2017, PixelCNN++, eq. 2), a probability mass
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["bernoulli_log_prob", "discretized_logistic_log_prob", "elbo",
           "gaussian_log_prob", "iwae", "kl_standard_normal", "reparameterize",
           "standard_normal_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)
# PixelCNN++'s lower clamp of the logistic log-scale (Salimans et al. 2017's code).
MIN_LOG_SCALE = -7.0


def _sum_rest(x):
  """[B, ...] → [B]: the sum over every axis but the first, in float32."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def reparameterize(key, mean, std):
  """z = μ + σ ⊙ ε, ε ~ N(0, I) drawn from `key` (Kingma & Welling 2014, eq. 4 with
  g(ε, x) = μ + σ ⊙ ε). mean, std: arrays of the same shape (any); the result has it.
  Differentiable in mean and std; the noise depends on key and the shape only."""
  mean, std = jnp.asarray(mean), jnp.asarray(std)
  eps = jax.random.normal(key, mean.shape, jnp.result_type(mean.dtype, jnp.float32))
  return mean + std * eps


def kl_standard_normal(mean, logvar):
  """KL(N(μ, diag σ²) ‖ N(0, I)) per example [B], in nats, with σ² = exp(logvar):

      ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)          (Kingma & Welling 2014, Appendix B)

  mean, logvar [B, ...] (a latent of any per-example shape), summed over all axes but
  the first."""
  mean, logvar = jnp.asarray(mean, jnp.float32), jnp.asarray(logvar, jnp.float32)
  return 0.5 * _sum_rest(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)


def gaussian_log_prob(x, mean, log_std):
  """log N(x; μ, σ²) summed per example [B] (a density on R^D):

      Σ_j −½ log 2π − log σ_j − ½ ((x_j − μ_j) / σ_j)²

  x [B, ...]; mean and log_std broadcast against x (a scalar log_std: a fixed σ)."""
  x = jnp.asarray(x, jnp.float32)
  mean, log_std = jnp.asarray(mean, jnp.float32), jnp.asarray(log_std, jnp.float32)
  d = (x - mean) * jnp.exp(-log_std)
  return _sum_rest(jnp.broadcast_to(-0.5 * _LOG_2PI - log_std - 0.5 * d * d, x.shape))


def standard_normal_log_prob(z):
  """log N(z; 0, I) summed per example [B]; z [B, ...]."""
  return gaussian_log_prob(z, 0.0, 0.0)


def bernoulli_log_prob(x01, logits):
  """log Bernoulli(x₀₁; σ(l)) summed per example [B]:

      Σ_j x_j log σ(l_j) + (1 − x_j) log(1 − σ(l_j)) = Σ_j x_j l_j − softplus(l_j)

  x01 [B, ...] in {0, 1} (a probability mass over {0, 1}^D; values in between give the
  cross-entropy, which is no likelihood of them), logits [B, ...]."""
  x01, logits = jnp.asarray(x01, jnp.float32), jnp.asarray(logits, jnp.float32)
  return _sum_rest(x01 * logits - jax.nn.softplus(logits))


def discretized_logistic_log_prob(x, mean, log_scale):
  """log P(x) summed per example [B] of 8-bit data x = n/127.5 − 1 (n ∈ {0..255}) under
  a logistic with location μ and scale s = exp(log_scale) discretised to the 256 bins
  (Salimans et al. 2017, PixelCNN++, eq. 2, one mixture component):

      P(x) = σ((x + 1/255 − μ)/s) − σ((x − 1/255 − μ)/s)     for −1 < x < 1,
      P(−1) = σ((−1 + 1/255 − μ)/s)                           (the mass below the first edge),
      P(1) = 1 − σ((1 − 1/255 − μ)/s)                         (the mass above the last edge),

  so the 256 masses sum to 1 for every μ, s. The interior difference is computed in
  log space, log(σ(a) − σ(b)) = log σ(a) + log σ(−b) + log(1 − e^{b−a}) (exact; no
  PixelCNN++ density fallback needed). log_scale is clamped below at −7 as in the
  PixelCNN++ code. x, mean, log_scale [B, ...] (broadcasting); x off the 8-bit grid is
  scored as the bin it falls in (the edge tests are x < −0.999 and x > 0.999)."""
  x = jnp.asarray(x, jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  log_scale = jnp.maximum(jnp.asarray(log_scale, jnp.float32), MIN_LOG_SCALE)
  inv_s = jnp.exp(-log_scale)
  centred = x - mean
  plus = inv_s * (centred + 1.0 / 255.0)    # a: the bin's upper edge
  minus = inv_s * (centred - 1.0 / 255.0)   # b: its lower edge
  log_cdf_plus = jax.nn.log_sigmoid(plus)          # log σ(a): x = −1
  log_sf_minus = jax.nn.log_sigmoid(-minus)        # log(1 − σ(b)): x = 1
  # log(1 − e^{b − a}), b − a = −(2/255)/s < 0: finite for every s.
  log_width = jnp.log(-jnp.expm1(-(2.0 / 255.0) * inv_s))
  log_mid = log_cdf_plus + log_sf_minus + log_width
  logp = jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_sf_minus, log_mid))
  return _sum_rest(jnp.broadcast_to(logp, jnp.broadcast_shapes(x.shape, logp.shape)))


def elbo(log_px_z, kl, beta: float = 1.0):
  """The (β-weighted) evidence lower bound per example [B] with the KL in closed form,

      E_q[log p(x | z)] − β·KL(q(z | x) ‖ p(z))     (Kingma & Welling 2014, eq. 10;
                                                    β: Higgins et al. 2017, eq. 4)

  log_px_z [B] (a one-sample estimate of the expectation, or [K, B]: averaged over the K
  samples), kl [B]. A lower bound on log p(x) for β = 1."""
  log_px_z = jnp.asarray(log_px_z, jnp.float32)
  if log_px_z.ndim == 2:
    log_px_z = jnp.mean(log_px_z, axis=0)
  return log_px_z - beta * jnp.asarray(kl, jnp.float32)


def iwae(log_px_z, log_pz, log_qz):
  """The importance-weighted bound per example [B] (Burda et al. 2016, eq. 8):

      log (1/K) Σ_k w_k = logsumexp_k(log p(x|z_k) + log p(z_k) − log q(z_k|x)) − log K,

  log_px_z, log_pz, log_qz [K, B] at the K samples z_k ~ q(z | x) of each example. K = 1:
  the Monte Carlo ELBO; E[·] increases with K to log p(x) (Theorem 1)."""
  log_w = (jnp.asarray(log_px_z, jnp.float32) + jnp.asarray(log_pz, jnp.float32)
           - jnp.asarray(log_qz, jnp.float32))
  if log_w.ndim != 2:
    raise ValueError(f"iwae: log-weights must be [K, B]; got shape {log_w.shape}")
  return jax.nn.logsumexp(log_w, axis=0) - math.log(log_w.shape[0])
