"""The one train step of every task: for each player in order, `updates` times,
loss → gradients → update; then the players' EMAs; one non-finite guard over it all.

    step = make_train_step(task)
    state, metrics = step(state, batch, key, axis_name=None)

Randomness is per example: example i of the global batch gets fold_in(key, i), so a
step computes the same numbers on 1 device, 8 devices, several hosts, or under pmap
(where the local slice's global offset comes from lax.axis_index). A player with k
updates per step does update u on the examples j ≡ u (mod k) (each device keeps its
own examples) and gets those examples' keys; its loss salts them with `ctx.update`
where updates must draw different noise. One exception to device independence:
network dropout draws one mask per call from a single key, so with model.dropout > 0
the pmap path (one call per device) differs from the jit path; jit on any number of
devices and hosts still agrees (threefry is partitionable).

Precision: each player's optimizer state and updates are at least float32, and so is
the EMA of its trained leaves, whatever model.param_dtype (`optim.in_float32`,
`state.ema_init`); the updated parameters are rounded to their own dtype.

A player with `start` > 0 changes nothing (parameters, optimizer state; its EMA
follows its unchanged parameters) before step `start`.

Non-finite loss or gradients in any update: nothing of the step is applied (every
player's parameters, EMA and optimizer state keep their old values; the step counter
advances) and metrics['nonfinite'] is 1; with config.train.on_nonfinite='stop' the
loop raises on it. (Not optax.apply_if_finite: that one applies the update anyway
after max_consecutive_errors.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.training.state import ema_update, get_in as _get, put_in as _put
from diffusion_jax.training.tasks.base import Player, StepContext

_DROPOUT_SALT = 0x7FFFFFFF  # a fold-in constant distinct from any example index


def example_keys(key, batch_size: int, axis_name: str | None = None):
  """One key per example: fold_in(key, global index) [batch_size]."""
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_size
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(batch_size))


def all_finite(*trees):
  """True iff every entry of every tree is finite (a scalar bool)."""
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for t in trees
                            for x in jax.tree.leaves(t)]))


def interleaved(x, k: int, i: int):
  """Examples j ≡ i (mod k) of x [B, ...] → [B/k, ...]."""
  if k == 1:
    return x
  return x.reshape((x.shape[0] // k, k) + x.shape[1:])[:, i]


def _masked(grads, mask, params):
  """Zeros where mask(params) is False: frozen leaves' gradients, which nothing then
  uses, so XLA does not compute them."""
  if mask is None:
    return grads
  return jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask(params))


def _player_update(player: Player, params, opt_state, batch, keys, ctx):
  """One update of `player` → (params, opt_state, loss, metrics, grads)."""
  theta = _get(params, player.name, player.optimized)

  def objective(theta):
    return player.loss(_put(params, theta, player.name, player.optimized), batch, keys, ctx)

  (loss, (metrics, new_params)), grads = jax.value_and_grad(objective, has_aux=True)(theta)
  grads = _masked(grads, player.mask, theta)
  if ctx.axis_name is not None:
    loss, metrics, grads = jax.lax.pmean((loss, metrics, grads), ctx.axis_name)
  updates, opt = player.tx.update(grads, _get(opt_state, player.name), theta)
  theta = optax.apply_updates(theta, updates)
  params = _put(new_params, theta, player.name, player.optimized)
  return params, _put(opt_state, opt, player.name), loss, metrics, grads


def make_train_step(task):
  """step(state, batch, key, axis_name=None) -> (state, metrics) for `task`'s players.

  With axis_name set (pmap), each update's loss, metrics and gradients are averaged
  over that axis, which equals the global mean since slices are equal-sized.

  Metrics: single-player tasks get the loss's own metrics plus loss, grad_norm, lr;
  multi-player tasks get every player's metrics (the last update's), `{prefix}_loss`,
  `grad_norm_{prefix}`, `lr_{prefix}`, and loss = the sum of the players' losses, lr =
  the last player's. Always nonfinite (0 or 1).
  """
  players = tuple(task.players)
  single = len(players) == 1

  def step(state, batch, key, axis_name=None):
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    keys = example_keys(key, batch_size, axis_name)
    dropout_root = jax.random.fold_in(key, _DROPOUT_SALT)
    if axis_name is not None:
      dropout_root = jax.random.fold_in(dropout_root, jax.lax.axis_index(axis_name))
    params, opt_state, ema = state.params, state.opt_state, state.ema_params
    finite, metrics, total, counter = jnp.array(True), {}, 0.0, 0
    for p in players:
      if batch_size % p.updates:
        raise ValueError(f"the per-device batch {batch_size} must divide by the "
                         f"{p.updates} updates per step of player {p.name!r}")
      for u in range(p.updates):  # static: unrolled
        ctx = StepContext(step=state.step, update=u, axis_name=axis_name, state=state,
                          dropout_key=jax.random.fold_in(dropout_root, counter))
        part = jax.tree.map(lambda x: interleaved(x, p.updates, u), batch)
        before = (params, opt_state)
        params, opt_state, loss, m, grads = _player_update(
            p, params, opt_state, part, interleaved(keys, p.updates, u), ctx)
        if p.start:  # not yet started: the update is computed, nothing of it kept
          params, opt_state = jax.lax.cond(state.step >= p.start, lambda: (params, opt_state),
                                           lambda: before)
        finite &= all_finite(loss, grads)
        counter += 1
      lr = p.schedule(state.step * p.updates)  # its own count of updates
      if single:
        metrics.update(m, loss=loss, grad_norm=optax.tree.norm(grads), lr=lr)
      else:
        metrics.update(m, **{f"{p.prefix}_loss": loss, f"grad_norm_{p.prefix}":
                             optax.tree.norm(grads), f"lr_{p.prefix}": lr})
        total, metrics["lr"] = total + loss, lr
      if p.ema_decay is not None:
        new = _get(params, p.name, p.optimized)
        averaged = ema_update(_get(ema, p.name, p.optimized), new, p.ema_decay, state.step)
        if p.mask is not None:  # a frozen leaf's EMA is the leaf itself, bit for bit
          averaged = jax.tree.map(lambda a, n, m: a if m else n, averaged, new, p.mask(new))
        # The EMA entry holds the player's current non-optimised variables (BatchNorm
        # statistics) beside the averaged parameters, so it samples like `params`.
        ema = _put(ema, _put(_get(params, p.name), averaged, p.optimized), p.name)
    if not single:
      metrics["loss"] = total
    new = (params, ema, opt_state)
    old = (state.params, state.ema_params, state.opt_state)
    # One conditional, not a select per leaf: the same result, and far less for XLA
    # to compile.
    params, ema, opt_state = jax.lax.cond(finite, lambda: new, lambda: old)
    metrics["nonfinite"] = 1 - finite.astype(jnp.int32)
    return state.replace(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state), metrics
  return step

