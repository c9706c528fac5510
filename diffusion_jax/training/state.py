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
  hold a dict per player in each (`state.init_state`). Randomness is not stored: a
  step's key is fold_in(root_key(seed), step)."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def get_in(tree, *keys):
  """tree[k0][k1]... (None keys are skipped: a single player's whole tree)."""
  for k in keys:
    if k is not None:
      tree = tree[k]
  return tree


def put_in(tree, value, *keys):
  """tree with tree[k0][k1]... replaced by value, dicts copied along the path (None keys
  are skipped)."""
  keys = [k for k in keys if k is not None]
  if not keys:
    return value
  return dict(tree, **{keys[0]: put_in(tree[keys[0]], value, *keys[1:])})


def widen(x):
  """x at least float32: a bfloat16 or float16 array as float32, anything else (float32,
  float64, integers) x itself. What the EMA and the optimizer state are kept in: half
  a bfloat16 spacing is 2⁻⁹–2⁻⁸ of the value (8 significand bits), so at d = 0.999 an
  EMA step (1 − d)·(p − ema) rounds away unless |p − ema| > ~2·|ema|, and the EMA
  stops moving; bfloat16(0.999) is 1, so a bfloat16 Adam ν never decays."""
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  return x


def ema_update(ema, params, decay: float, step):
  """ema ← d·ema + (1 − d)·params with d = min(decay, (1 + step)/(10 + step)), the
  warm-up of TF's ExponentialMovingAverage, so short runs are not dominated by init.
  Computed and kept in the EMA's dtype (float32 for bfloat16 parameters: `ema_init`)."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p.astype(e.dtype)).astype(e.dtype),
                      ema, params)


def ema_init(player, variables):
  """The initial EMA entry of `player` over its `variables`: a copy (no buffer shared
  with the parameters, which the step donates) whose trained leaves are at least
  float32 (`widen`). Frozen leaves (`player.mask`) and non-optimised variables
  (BatchNorm statistics) keep their dtype: their EMA is the leaf itself."""
  theta = get_in(variables, player.optimized)
  mask = player.mask(theta) if player.mask is not None else jax.tree.map(lambda _: True, theta)
  theta = jax.tree.map(lambda x, m: widen(x) if m else x, theta, mask)
  return jax.tree.map(jnp.copy, put_in(variables, theta, player.optimized))


def init_state(players, params) -> TrainState:
  """The initial TrainState of `players` over `params` (the whole variables tree):
  each player's optimizer state over its optimised parameters (frozen ones get none:
  see `optim.make`; float32 moments whatever the parameters' dtype), and an EMA copy
  of each player that keeps one (`ema_init`: float32 for bfloat16 parameters).
  Single-player tasks (name None) hold the tree itself in params, ema_params and
  opt_state; multi-player tasks a dict per player name."""
  players = tuple(players)
  if len(players) == 1 and players[0].name is None:
    p = players[0]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=ema_init(p, params) if p.ema_decay is not None else {},
                      opt_state=p.tx.init(params if p.optimized is None else params[p.optimized]))
  if any(p.name is None for p in players):
    raise ValueError("every player of a multi-player task needs a name")
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params={p.name: ema_init(p, params[p.name]) for p in players
                  if p.ema_decay is not None},
      opt_state={p.name: p.tx.init(params[p.name] if p.optimized is None
                                           else params[p.name][p.optimized]) for p in players})
