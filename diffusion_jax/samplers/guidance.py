"""Classifier-free guidance (Ho & Salimans 2022; seed 000, "CFG").

    f̃(x_t, t, y) = (1 + w)·f(x_t, t, y) − w·f(x_t, t, ∅)

w = 0 is the conditional model, w > 0 sharpens towards the class. On scores this is
the notes' γ-interpolation γ·∇log p_t(x|y) + (1 − γ)·∇log p_t(x) with γ = 1 + w. Because the
prediction conversions are linear in f for fixed (x_t, t), guiding the prediction
equals guiding x̂₀, ε̂, the score or the velocity. The conditional and unconditional
passes are batched into one network call.
"""
from __future__ import annotations

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
