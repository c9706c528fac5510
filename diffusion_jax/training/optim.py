"""Optimizer and learning-rate schedule from config.optim, and the trainable subset."""
from __future__ import annotations

import re

import jax
import optax

from diffusion_jax import parallel
from diffusion_jax.training import state


def schedule(optim_cfg, num_steps: int):
  """Linear warmup to optim.lr, then constant or cosine decay to lr·min_lr_ratio."""
  lr, warmup = optim_cfg.lr, optim_cfg.warmup_steps
  if optim_cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif optim_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, max(num_steps - warmup, 1), alpha=optim_cfg.min_lr_ratio)
  else:
    raise ValueError(f"config.optim.schedule={optim_cfg.schedule!r}: expected cosine | constant")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def trainable(patterns):
  """None (every parameter trains) or mask(params) -> bool pytree: True where the
  leaf's path ('down_0/res_0/conv_0/kernel', within the player's parameters)
  re.search-es one of `patterns` (config.optim.trainable). A pattern that matches no
  parameter is an error naming it."""
  if not patterns:
    return None
  compiled = [(p, re.compile(p)) for p in patterns]

  def mask(params):
    paths = [parallel.leaf_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    unused = [p for p, r in compiled if not any(r.search(x) for x in paths)]
    if unused:
      raise ValueError(f"config.optim.trainable: {unused} match no parameter (paths look "
                       f"like {paths[:3]})")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(r.search(parallel.leaf_path(path)) for _, r in compiled), params)
  return mask


def make(optim_cfg, num_steps: int, patterns=None):
  """Returns (optax transformation, schedule). With config.optim.trainable (or the
  `patterns`, a task's own choice, e.g. a fine-tuning method's), only the
  matching parameters are updated and only they have optimizer state (the frozen ones
  go through `optax.set_to_zero`, whose state is empty): memory follows what trains.
  The optimizer state and updates are float32 whatever the parameters' dtype
  (`in_float32`)."""
  sched = schedule(optim_cfg, num_steps)
  if optim_cfg.name == "adamw":
    opt = optax.adamw(sched, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                      weight_decay=optim_cfg.weight_decay)
  elif optim_cfg.name == "adam":
    opt = optax.adam(sched, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps)
  elif optim_cfg.name == "sgd":
    opt = optax.sgd(sched, momentum=optim_cfg.b1)
  else:
    raise ValueError(f"config.optim.name={optim_cfg.name!r}: expected adamw | adam | sgd")
  # Always a chain, so the optimizer state's structure does not depend on whether
  # clipping is on (a resumed run may change optim.grad_clip).
  clip = optim_cfg.grad_clip if optim_cfg.grad_clip > 0 else float("inf")
  return masked(in_float32(optax.chain(optax.clip_by_global_norm(clip), opt)),
                trainable(optim_cfg.trainable if patterns is None else patterns)), sched


def in_float32(tx):
  """tx computed in at least float32: the gradients and parameters it is given are
  widened (`state.widen`: bfloat16, float16 → float32) first, so its state (Adam's
  moments, SGD's momentum) is float32 and so are the updates it returns, which
  optax.apply_updates adds to the parameters in float32 before rounding the sum to the
  parameters' dtype. Same state structure as tx; on float32 parameters it is tx.
  (optax.adam's mu_dtype covers the first moment only.)"""
  widen = lambda tree: jax.tree.map(state.widen, tree)

  def init(params):
    return tx.init(widen(params))

  def update(updates, opt_state, params=None):
    return tx.update(widen(updates), opt_state, None if params is None else widen(params))
  return optax.GradientTransformation(init, update)


def masked(tx, mask):
  """tx on the leaves where mask(params) is True; the others frozen, with no state."""
  if mask is None:
    return tx
  return optax.multi_transform(
      {"train": tx, "frozen": optax.set_to_zero()},
      lambda params: jax.tree.map(lambda m: "train" if m else "frozen", mask(params)))
