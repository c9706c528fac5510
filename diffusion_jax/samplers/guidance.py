"""Guidance: classifier-free (on the network) and classifier (on the denoiser).

Classifier-free guidance (Ho & Salimans 2022):

    f̃(x_t, t, y) = (1 + w)·f(x_t, t, y) − w·f(x_t, t, ∅)

w = 0 is the conditional model, w > 0 sharpens towards the class. On scores this is
the γ-interpolation γ·∇log p_t(x|y) + (1 − γ)·∇log p_t(x) with γ = 1 + w. Because the
prediction conversions are linear in f for fixed (x_t, t), guiding the prediction
equals guiding x̂₀, ε̂, the score or the velocity. The conditional and unconditional
passes are batched into one network call.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def classifier_free(model_fn, guidance: float, null_label: int):
  """Wraps model_fn(x, t, labels) into its guided version (identity when w = 0)."""
  if guidance == 0:
    return model_fn

  def guided(x, t, labels):
    out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = jnp.split(out, 2)
    return (1.0 + guidance) * cond - guidance * uncond
  return guided


def classifier(denoiser, path, log_prob_fn, scale: float):
  """Classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021, eq. 14):
  the score gains s·∇log p(y | x_t, t),

      score' = score + s·g,   g = ∇_x log p(y | x_t, t),

  i.e. with score = −ε̂/b:  ε̂' = ε̂ − s·b·g  and  x̂₀' = (x_t − b·ε̂')/a = x̂₀ + s·b²/a·g.
  At s = 1 with the exact classifier, an unconditional denoiser becomes the exact
  conditional one (Bayes: ∇log p_t(x|y) = ∇log p_t(x) + ∇log p_t(y|x)). On DDPM's
  ancestral step this is the shifted mean μ + s·Σ·g up to O(β_t). Where a(t) = 0 (the
  flow path at t = 1) x_t carries no information about y and x̂₀ is left unchanged.

  denoiser(x_t, t) → (x̂₀, ε̂); log_prob_fn(x_t [B, ...], t [B]) → log p(y_i | x_t_i) [B]
  with the labels bound. Returns the guided denoiser; identity when s = 0.
  """
  if scale == 0:
    return denoiser

  def guided(x_t, t):
    x0, eps = denoiser(x_t, t)
    t_b = jnp.full((x_t.shape[0],), t, jnp.float32)
    # Examples are independent, so the gradient of the sum is the per-example gradient.
    g = jax.grad(lambda x: jnp.sum(log_prob_fn(x, t_b)))(x_t.astype(jnp.float32))
    a, b = path.ab(t)
    eps = eps - scale * b * g
    x0 = jnp.where(a > 0, x0 + scale * b ** 2 / jnp.where(a > 0, a, 1.0) * g, x0)
    return x0, eps
  return guided
