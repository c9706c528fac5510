"""Training-time distributions over t ∈ [0, 1] (one draw per example).

* uniform:      t ~ U(t_min, 1)
* logit_normal: t = sigmoid(m + s·n), n ~ N(0, 1)   (SD3, Esser et al. 2024)
* discrete:     t = i/T, i ~ U{1..T}                  (DDPM)
Any of them can be followed by the resolution shift t' = k·t / (1 + (k − 1)·t)
(SD3 §5.3.2); k = 1 is the identity.
"""
from __future__ import annotations

import jax

TIME_SAMPLERS = ("uniform", "logit_normal", "discrete")


def sample_t(cfg, path, key):
  """One scalar t for one example. `cfg` is config.diffusion."""
  kind = cfg.time_sampling
  if kind == "uniform":
    t = jax.random.uniform(key, (), minval=cfg.t_min, maxval=1.0)
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, ()))
  elif kind == "discrete":
    if not path.discrete:
      raise ValueError("diffusion.time_sampling='discrete' needs a discrete path "
                       f"(diffusion.path='vp_discrete'), got {path.kind!r}")
    t = jax.random.randint(key, (), 1, path.num_steps + 1) / path.num_steps
  else:
    raise ValueError(f"diffusion.time_sampling={kind!r}: expected one of {TIME_SAMPLERS}")
  k = cfg.time_shift
  return k * t / (1.0 + (k - 1.0) * t)
