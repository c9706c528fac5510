"""Denoising objectives: E_{t,x,z} w(t)·‖f_θ(x_t, t) − (c(t)·x + d(t)·z)‖² (Ho et al. 2020 eq. 14;
Kingma et al. 2021),
with w(t) from `predictions.loss_weight` (uniform, SNR, min-SNR-γ, EDM, VLB).

With prediction='velocity' on the flow path this is rectified flow / conditional flow
matching; with prediction='eps' on the discrete VP path it is DDPM's L_simple.
Randomness is per example (one key each), so the loss of an example does not depend
on which device or host computes it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import predictions, time_sampling


def noise_example(cfg, path, key, x0, label, num_classes: int):
  """Draws (t, z, x_t, conditioning label) for one example x0 [H, W, C].

  The label is replaced by the null class `num_classes` with probability
  cfg.label_dropout (classifier-free guidance training, Ho & Salimans 2022).
  """
  k_t, k_z, k_drop = jax.random.split(key, 3)
  t = path.snap(time_sampling.sample_t(cfg, path, k_t))
  z = jax.random.normal(k_z, x0.shape, x0.dtype)
  a, b = path.ab(t)
  x_t = a * x0 + b * z
  if num_classes:
    drop = jax.random.bernoulli(k_drop, cfg.label_dropout)
    label = jnp.where(drop, num_classes, label)
  return t, z, x_t, label


def loss(cfg, path, model_fn, x0, labels, keys, num_classes: int):
  """Mean denoising loss over a batch.

  Args:
    cfg: config.diffusion.
    path: a `paths.Path`.
    model_fn: (x_t [B,H,W,C], t [B], labels [B]) -> prediction [B,H,W,C].
    x0: clean images [B, H, W, C] in [-1, 1].
    labels: int [B] (ignored when num_classes == 0).
    keys: one PRNG key per example [B, 2].
  Returns:
    (scalar loss, per-example losses [B]).
  """
  t, z, x_t, labels = jax.vmap(
      lambda k, x, y: noise_example(cfg, path, k, x, y, num_classes))(keys, x0, labels)
  pred = model_fn(x_t, t, labels).astype(jnp.float32)
  tgt = predictions.target(path, cfg.prediction, x0, z, t)
  per_example = jnp.mean(jnp.square(pred - tgt), axis=tuple(range(1, x0.ndim)))
  per_example = predictions.loss_weight(cfg, path, t) * per_example
  return jnp.mean(per_example), per_example
