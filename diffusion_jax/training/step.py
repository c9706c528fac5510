"""The generic train step: loss → gradients → update → EMA, for any task's loss.

    state, metrics = step(state, batch, key)

Randomness is per example: example i of the global batch gets fold_in(key, i), so a
step computes the same numbers on 1 device, 8 devices, several hosts, or under pmap
(where the local slice's global offset comes from lax.axis_index). One exception:
network dropout draws one mask per call from a single key, so with model.dropout > 0
the pmap path (one call per device) differs from the jit path; jit on any number of
devices and hosts still agrees (threefry is partitionable).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffusion_jax.training.state import ema_update

_DROPOUT_SALT = 0x7FFFFFFF  # a fold-in constant distinct from any example index


def example_keys(key, batch_size: int, axis_name: str | None = None):
  """One key per example: fold_in(key, global index) [batch_size]."""
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch_size
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(batch_size))


def all_finite(loss, grads):
  """True iff the loss and every gradient entry are finite (a scalar bool)."""
  return jnp.isfinite(loss) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))


def make_train_step(loss_fn, tx, lr_schedule, *, ema_decay: float):
  """Builds step(state, batch, key, axis_name=None) -> (state, metrics).

  loss_fn(params, batch, example_keys, dropout_key) -> (scalar loss, metrics dict), a
  mean over the (local) batch. With axis_name set (pmap), losses and gradients are
  averaged over that axis, which equals the global mean since slices are equal-sized.

  Non-finite loss or gradients: the update is not applied (params, EMA, optimizer
  state keep their old values; the step counter advances) and metrics['nonfinite']
  is 1; with config.train.on_nonfinite='stop' the loop raises on it. (Not optax.apply_if_finite:
  that one applies the update anyway after max_consecutive_errors.)
  """
  def step(state, batch, key, axis_name=None):
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    keys = example_keys(key, batch_size, axis_name)
    dropout_key = jax.random.fold_in(key, _DROPOUT_SALT)
    if axis_name is not None:
      dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, keys, dropout_key)
    if axis_name is not None:
      loss, metrics, grads = jax.lax.pmean((loss, metrics, grads), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, ema_decay, state.step)
    finite = all_finite(loss, grads)
    # One conditional, not a select per leaf: the same result, and far less for XLA
    # to compile.
    params, ema, opt_state = jax.lax.cond(
        finite, lambda: (params, ema, opt_state),
        lambda: (state.params, state.ema_params, state.opt_state))
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                              opt_state=opt_state)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=lr_schedule(state.step), nonfinite=1 - finite.astype(jnp.int32))
    return new_state, metrics
  return step
