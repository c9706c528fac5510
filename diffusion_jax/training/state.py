"""The train state: everything a run needs to continue, in one pytree."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params / ema_params: the network's parameters and their
  exponential moving average; opt_state: the optax state. Randomness is not stored:
  a step's key is fold_in(root_key(seed), step)."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any

  @classmethod
  def create(cls, params, tx):
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))


def ema_update(ema, params, decay: float, step):
  """ema ← d·ema + (1 − d)·params with d = min(decay, (1 + step)/(10 + step)), the
  warm-up of TF's ExponentialMovingAverage, so short runs are not dominated by init."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
