"""Orbax checkpoints: the train state, the data iterator's state and run metadata.

Layout: <workdir>/checkpoints/<step>/{state, data, meta}. Saves are asynchronous (the
train loop continues while arrays are written), keep the last N, and are atomic: a
save killed half way leaves only a `*.orbax-checkpoint-tmp*` folder, which is ignored
and cleaned up on the next start (`cleanup_tmp_directories`). Restores take explicit
target shardings, so a run saved on 8 devices restores onto 1 (or onto a pod).
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only, enable_async_checkpointing=async_save)
  # Replica-parallel saving splits each replicated array's write across its replicas;
  # on CPU meshes it costs one compiled slice per array and shard (seconds per save
  # on 8 virtual devices), so arrays are written from their first replica instead.
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
      "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, meta: dict) -> None:
  """Starts an (async) save of step; `mngr.wait_until_finished()` blocks for it."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta)), force=True)


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, shardings):
  """Returns (state, data_state, meta) with state placed on `shardings`."""
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
      data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  return out["state"], out["data"], out["meta"]
