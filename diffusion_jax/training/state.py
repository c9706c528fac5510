"""The train state: everything a run needs to continue, in one pytree."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params / ema_params: the task's parameters and their
  exponential moving average; opt_state: the optax state. Tasks with several players
  hold a dict per player in each (`step.init_state`). Randomness is not stored: a
  step's key is fold_in(root_key(seed), step)."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def ema_update(ema, params, decay: float, step):
  """ema ← d·ema + (1 − d)·params with d = min(decay, (1 + step)/(10 + step)), the
  warm-up of TF's ExponentialMovingAverage, so short runs are not dominated by init."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
