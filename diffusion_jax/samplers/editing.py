"""Editing with any sampler: SDEdit and inpainting (editing is a sampler
variant, not a new model).

SDEdit (Meng et al. 2022). Noise an input y to t₀ with the forward marginal

    x_{t₀} = a(t₀)·y + b(t₀)·z,

then solve back to t = 0 with any sampler started at `t_start = t₀`. For data
N(μ, s²·I) and an exact sampler the result is Gaussian with mean μ + k·a·(y − μ) and
variance k²·b² + s²·b²/(a²s² + b²), k = a·s²/(a²s² + b²) (the posterior of x given
x_{t₀}, averaged over z): t₀ → 0 returns y, t₀ = 1 forgets it.

Inpainting by replacement (Song et al. 2021, App. I; RePaint without resampling). The
known pixels (mask = 1) replace the denoiser's x̂₀ there, and ε̂ is re-derived as
(x_t − a·x̂₀)/b, so every sampler moves the known region along a forward trajectory of
the known image while the network fills in the rest from it. Where the unknown pixels
are independent of the known ones this samples their exact distribution; where they
depend on them it is the usual approximation (the network sees the known region only
through x_t). The known pixels are pasted into the final sample (`paste`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def noise_to(path, y, t0: float, keys):
  """x_{t₀} = a(t₀)·y + b(t₀)·z for y [B, ...], z drawn from each example's key [B]."""
  a, b = path.ab(jnp.float32(t0))
  z = jax.vmap(lambda k: jax.random.normal(k, y.shape[1:], y.dtype))(keys)
  return a * y + b * z


def inpaint(denoiser, path, known, mask):
  """denoiser(x_t, t) → (x̂₀, ε̂) with x̂₀ = mask·known + (1 − mask)·x̂₀ and
  ε̂ = (x_t − a·x̂₀)/b (kept where b = 0). known [B, H, W, C], mask broadcastable to it
  (1 = known pixel)."""
  def guided(x_t, t):
    x0, eps = denoiser(x_t, t)
    a, b = path.ab(t)
    x0 = mask * known + (1.0 - mask) * x0
    eps = jnp.where(b > 0, (x_t - a * x0) / jnp.where(b > 0, b, 1.0), eps)
    return x0, eps
  return guided


def paste(x, known, mask):
  """The known pixels into the final sample: mask·known + (1 − mask)·x."""
  return mask * known + (1.0 - mask) * x


REGIONS = ("center", "left", "right", "top", "bottom")


def mask(region, num: int, shape) -> np.ndarray:
  """Inpainting mask float32 [num, H, W, 1], 1 = keep the input's pixel.

  region: a name in REGIONS — the part to regenerate (the central half-size square, or
  a half of the image) — or an array [H, W] or [num, H, W] of 0/1 (1 = keep).
  """
  h, w = shape[0], shape[1]
  if isinstance(region, str):
    if region not in REGIONS:
      raise ValueError(f"inpainting region {region!r}: expected one of {REGIONS} or a mask")
    keep = np.ones((h, w), np.float32)
    sl = {"center": (slice(h // 4, h - h // 4), slice(w // 4, w - w // 4)),
          "left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, None)),
          "top": (slice(0, h // 2), slice(None)), "bottom": (slice(h // 2, None), slice(None))}
    keep[sl[region]] = 0.0
    region = keep
  region = np.asarray(region, np.float32)
  if region.shape[-2:] != (h, w) or region.ndim not in (2, 3):
    raise ValueError(f"inpainting mask of shape {region.shape}: expected [{h}, {w}] or "
                     f"[N, {h}, {w}]")
  if not np.all((region == 0) | (region == 1)):
    raise ValueError("inpainting mask values must be 0 (regenerate) or 1 (keep)")
  region = np.broadcast_to(region, (1, h, w)) if region.ndim == 2 else region
  return np.resize(region, (num, h, w))[..., None]
