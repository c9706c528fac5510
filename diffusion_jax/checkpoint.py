"""Orbax checkpoints: the train state, the data iterator's state and run metadata.

Layout: <workdir>/checkpoints/<step>/{state, data, meta}. Saves are asynchronous (the
train loop continues while arrays are written), keep the last N, and are atomic: a
save killed half way leaves only a `*.orbax-checkpoint-tmp*` folder, which is ignored
and cleaned up on the next start (`cleanup_tmp_directories`). Restores take explicit
target shardings, so a run saved on 8 devices restores onto 1 (or onto a pod).
"""
from __future__ import annotations


import jax
import orbax.checkpoint as ocp

from diffusion_jax import io


def manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  directory = io.path(workdir) / "checkpoints"
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


class Unreadable(Exception):
  """A checkpoint step that cannot be read (damaged or partly deleted files)."""


def check_structure(mngr: ocp.CheckpointManager, step: int, abstract_state) -> list[str]:
  """The differences between the state saved at `step` and `abstract_state` (paths
  missing on either side, shapes and dtypes that differ), read from the array
  metadata without restoring anything. Raises `Unreadable` if that metadata is."""
  try:
    saved = mngr.item_metadata(step)["state"]
    saved = getattr(saved, "tree", saved)
    saved_flat = {_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved)[0]}
  except Exception as e:  # noqa: BLE001 — any failure to read is "unreadable"
    raise Unreadable(f"{type(e).__name__}: {e}") from e
  want = {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  problems = [f"{k}: in the config's state, not in the checkpoint" for k in want.keys() - saved_flat.keys()]
  problems += [f"{k}: in the checkpoint, not in the config's state" for k in saved_flat.keys() - want.keys()]
  for k in sorted(want.keys() & saved_flat.keys()):
    m, x = saved_flat[k], want[k]
    shape, dtype = tuple(getattr(m, "shape", ()) or ()), getattr(m, "dtype", None)
    if shape != tuple(x.shape) or (dtype is not None and jax.numpy.dtype(dtype) != x.dtype):
      problems.append(f"{k}: checkpoint has {dtype}{list(shape)}, config has {x.dtype}{list(x.shape)}")
  return sorted(problems)


def _name(path) -> str:
  """'params/Dense_0/kernel' of a tree path, alike for dataclass fields and dict keys."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def read(mngr: ocp.CheckpointManager, step: int, abstract_state, shardings):
  """`restore`, with every failure of a checkpoint whose structure matches
  (`check_structure` is the caller's) reported as `Unreadable`."""
  try:
    return restore(mngr, step, abstract_state, shardings)
  except Exception as e:  # noqa: BLE001
    raise Unreadable(f"{type(e).__name__}: {e}") from e


def set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Moves the checkpoint of `step` out of the manager's directory, to
  `<workdir>/damaged_checkpoints/<step>-<id>` (kept, never deleted), and reloads the
  manager so a new save of that step can be written. Process 0 moves it; every process
  waits for that."""
  import uuid
  from jax.experimental import multihost_utils
  src = io.path(mngr.directory) / str(step)
  dst = io.path(mngr.directory).parent / "damaged_checkpoints" / f"{step}-{uuid.uuid4().hex[:8]}"
  if jax.process_index() == 0:
    io.move_tree(src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"set_aside_{step}")
  mngr.reload()
  return str(dst)
