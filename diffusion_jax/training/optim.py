"""Optimizer and learning-rate schedule from config.optim."""
from __future__ import annotations

import optax


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


def make(optim_cfg, num_steps: int):
  """Returns (optax transformation, schedule)."""
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
  return optax.chain(optax.clip_by_global_norm(clip), opt), sched
