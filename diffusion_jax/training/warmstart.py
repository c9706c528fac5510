"""Starting a run from another run's parameters (config.init): fine-tuning, a grown
class table or vocabulary, a new head on a trained body.

    state = warmstart.apply(config, state, mesh, shardings)   # a fresh state, step 0

The base run is read as a component (`runs.load`: its EMA or raw parameters, never its
optimizer state); its parameter paths, rewritten by `config.init.map` ((regex,
replacement), ...: t5x's assignment map, e.g. (('^', 'denoiser/'),) puts a diffusion
run's network under a fine-tuning run's 'denoiser' entry), are matched to the new
state's parameter paths. A parameter of the same path and shape is copied. Every other
case needs a rule, `config.init.rules` ((regex over the new path, rule), ...; for
'drop', over the base path):

    init         keep the new run's own initialisation (a new parameter, or a reshaped
                 one whose old values are discarded)
    grow         the old array in the leading corner of every axis, the new entries from
                 the new run's initialisation (a grown table keeps every old row)
    grow_zeros   the same, the new entries zero
    grow_mean    the same, the new rows (axis 0 only) the mean of the old rows (a common
                 initialisation of new token embeddings)
    grow_last    axis 0 only: the old rows but the last at the front, the old last row
                 moved to the new last row, the rows between from the new initialisation
                 (class tables whose last row is the ∅ label of classifier-free guidance)
    drop         a base parameter the new run does not have is left out

A parameter that neither matches nor has a rule is an error naming every such path
(nothing is started). The EMA starts equal to the new parameters, the optimizer state
fresh, the step at 0; a run that resumes from its own checkpoint never reads the base
again.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from diffusion_jax import runs
from diffusion_jax.training.state import get_in

__all__ = ["RULES", "apply", "merge", "trainable_summary"]

RULES = ("init", "grow", "grow_zeros", "grow_mean", "grow_last", "drop")


def _rule(rules, path):
  for pattern, rule in rules:
    if re.search(pattern, path):
      return rule
  return None


def _grown(rule, old, fresh):
  """The new array of a reshaped parameter under a grow rule (numpy)."""
  old, fresh = np.asarray(old), np.asarray(fresh)
  if old.ndim != fresh.ndim or any(o > n for o, n in zip(old.shape, fresh.shape)):
    return None
  if rule in ("grow_mean", "grow_last") and old.shape[1:] != fresh.shape[1:]:
    return None
  out = np.array(fresh, dtype=fresh.dtype)
  if rule == "grow_zeros":
    out[...] = 0
  elif rule == "grow_mean":
    out[...] = old.mean(axis=0, keepdims=True).astype(out.dtype)
  if rule == "grow_last":
    out[:old.shape[0] - 1] = old[:-1]
    out[-1] = old[-1]
  else:
    out[tuple(slice(0, s) for s in old.shape)] = old
  return out


def merge(fresh, base, *, mapping=(), rules=()):
  """The new parameter tree: `fresh` (the new run's initialisation) with the `base`
  run's parameters copied in where their (mapped) paths and shapes match, reshaped ones
  by their rule (module docstring). Raises naming every parameter that neither matches
  nor has a rule, or whose rule does not fit its shapes."""
  for _, rule in rules:
    if rule not in RULES:
      raise ValueError(f"config.init.rules: rule {rule!r}; expected one of {list(RULES)}")
  new = traverse_util.flatten_dict(fresh, sep="/")
  old = {}
  for path, value in traverse_util.flatten_dict(base, sep="/").items():
    mapped = path
    for pattern, replacement in mapping:
      mapped = re.sub(pattern, replacement, mapped)
    if mapped in old:
      raise ValueError(f"config.init.map sends both {old[mapped][0]} and {path} of the base "
                       f"run to {mapped}")
    old[mapped] = (path, value)
  problems, out = [], {}
  for path, value in new.items():
    rule = _rule(rules, path)
    if path not in old:
      if rule == "init":
        out[path] = value
      else:
        problems.append(f"{path} {tuple(value.shape)}: not in the base run")
      continue
    source, prior = old[path]
    if tuple(prior.shape) == tuple(value.shape) and rule != "init":
      # jax Arrays stay on their devices (a sharded base is never gathered to a host).
      out[path] = prior if prior.dtype == value.dtype else prior.astype(value.dtype)
    elif rule == "init":
      out[path] = value
    elif rule is not None and rule.startswith("grow"):
      grown = _grown(rule, prior, value)
      if grown is None:
        problems.append(f"{path}: rule {rule!r} cannot grow {tuple(prior.shape)} to "
                        f"{tuple(value.shape)}")
      else:
        out[path] = jnp.asarray(grown)
    else:
      problems.append(f"{path}: base run has {tuple(prior.shape)}, this run "
                      f"{tuple(value.shape)}")
  for path, (source, prior) in old.items():
    if path not in new and _rule(rules, source) != "drop":
      problems.append(f"{source} {tuple(prior.shape)}: the base run's, not in this run"
                      + (f" (mapped to {path})" if path != source else ""))
  if problems:
    raise ValueError(
        "config.init.from_workdir: parameters that neither match the base run nor have a "
        "rule in config.init.rules (init | grow | grow_zeros | grow_mean | grow_last for "
        "this run's paths, drop for the base run's; config.init.map rewrites the base "
        "run's paths):\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(out, sep="/")


def apply(config, state, mesh, shardings):
  """The fresh `state` started from config.init.from_workdir (a no-op without it):
  parameters merged (`merge`), placed with the state's shardings; the EMA entries equal
  to the parameters of the same path; optimizer state and step as they are (fresh)."""
  c = config.init
  if not c.from_workdir:
    return state
  comp = runs.load(c.from_workdir, step=c.step, params=c.params, mesh=mesh)
  params = merge(state.params, comp.params, mapping=tuple(tuple(m) for m in c.map),
                 rules=tuple(tuple(r) for r in c.rules))
  flat = traverse_util.flatten_dict(params, sep="/")
  ema = state.ema_params
  if ema:
    ema = traverse_util.unflatten_dict(
        {p: flat[p].astype(v.dtype) if p in flat else v
         for p, v in traverse_util.flatten_dict(ema, sep="/").items()},
        sep="/")
  # Every leaf onto the state's sharding, copied on device (the EMA and the parameters
  # must not share buffers: the step donates the state; a grown table, built on the
  # host, is small).
  place = lambda tree, target: jax.tree.map(
      lambda x, s: jax.device_put(x, s, may_alias=False), tree, target)
  return state.replace(params=place(params, shardings.params),
                       ema_params=place(ema, shardings.ema_params) if ema else state.ema_params)


def trainable_summary(players, params) -> list[tuple[str, int, int]]:
  """(player, trainable parameters, all parameters) of each player, for the start-up
  report: what `config.optim.trainable` (or a fine-tuning method) leaves to train."""
  out = []
  for p in players:
    theta = get_in(params, p.name, p.optimized)
    sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), theta)
    total = sum(jax.tree.leaves(sizes))
    if p.mask is None:
      trained = total
    else:
      trained = sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(p.mask(theta)))
                    if m)
    out.append((p.name or "model", trained, total))
  return out
