"""The one abstraction every sampler shares (as in EDM): a denoiser.

    denoiser(x_t [B,...], t scalar) -> (x̂₀ [B,...], ε̂ [B,...])

It is built from a network (`model_fn(x_t, t [B], labels [B]) -> prediction`), the
path and the prediction type, through the exact conversions of
`diffusion.predictions`. Guidance wraps `model_fn` (see `guidance.py`), so every
sampler gets it for free.
"""
from __future__ import annotations

import jax.numpy as jnp

from diffusion_jax.diffusion import predictions


def make_denoiser(model_fn, path, prediction: str, labels, clip_x0: bool = False):
  """Returns denoiser(x_t, t) for fixed conditioning `labels` [B].

  clip_x0: clip x̂₀ to the data range [-1, 1] and re-derive ε̂ = (x_t − a·x̂₀)/b, as
  DDPM's sampler does; it keeps ε-prediction stable where a(t) ≈ 0.
  """
  def denoiser(x_t, t):
    t_b = jnp.full((x_t.shape[0],), t, jnp.float32)
    pred = model_fn(x_t, t_b, labels).astype(jnp.float32)
    x0, eps = predictions.to_x0_eps(path, prediction, pred, x_t, t_b)
    if clip_x0:
      a, b = path.ab(t)
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = jnp.where(b > 0, (x_t - a * x0) / jnp.where(b > 0, b, 1.0), eps)
    return x0, eps
  return denoiser
