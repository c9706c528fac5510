"""Devices, meshes, shardings and hosts.

One mesh over every device of every host, with two axes:
  'data' — the batch is split over it (data parallelism);
  'fsdp' — parameters (and their optimizer state and EMA) are split over it, and the
           batch too (ZeRO-3 / FSDP style: XLA all-gathers weights where used).
The batch is sharded over ('data', 'fsdp') jointly, so every device holds a distinct
slice of the global batch. Each host feeds only its own slice (`host_to_global`).

The same step body also compiles with `jax.pmap` (`pmap_step`), for pmap-era code.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str | None = None) -> None:
  """`jax.distributed.initialize` for multi-host runs.

  On a TPU pod, SLURM or Open MPI, JAX detects everything: call with no arguments.
  Elsewhere pass the coordinator's host:port, the process count and this process's id.
  cpu_collectives='gloo' enables cross-process collectives on CPU (tests, laptops).
  """
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """config.mesh → Mesh(('data', 'fsdp')). data = -1 takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  fsdp = mesh_cfg.fsdp
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} must divide the {n} devices")
  data = n // fsdp if mesh_cfg.data == -1 else mesh_cfg.data
  if data * fsdp != n:
    raise ValueError(f"config.mesh.data={mesh_cfg.data} × config.mesh.fsdp={fsdp} "
                     f"must equal the number of devices ({n})")
  # Auto axes: XLA's sharding propagation places intermediates (the classic GSPMD
  # mode); explicit-sharding types would demand annotations throughout the models.
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def padded_size(n: int, mesh: Mesh) -> int:
  """n rounded up to a multiple of the mesh's device count."""
  d = mesh.devices.size
  return -(-n // d) * d


def shard_padded(a, size: int, mesh: Mesh):
  """A full numpy array [n, ...] (the same on every host), zero-padded to [size, ...]
  and placed batch-sharded over the mesh (each device gets its rows)."""
  a = np.asarray(a)
  a = np.concatenate([a, np.zeros((size - len(a),) + a.shape[1:], a.dtype)])
  return jax.make_array_from_callback(a.shape, batch_sharding(mesh), lambda idx: a[idx])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "data.batch_size") -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"config.{key}={batch_size} is not divisible by the number of "
                     f"devices ({n}); use a multiple of {n}")
  if batch_size % jax.process_count():
    raise ValueError(f"config.{key}={batch_size} is not divisible by the number of "
                     f"processes ({jax.process_count()})")


def fsdp_spec(shape, fsdp: int, min_size: int) -> P:
  """Shards the largest axis divisible by the fsdp size; small arrays stay replicated."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def leaf_path(path) -> str:
  """A jax.tree key path → 'params/blocks_3/attn/qkv/kernel' (the string rules match)."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def rule_spec(path: str, shape, rules, mesh: Mesh) -> P | None:
  """The PartitionSpec of the first rule whose regex re.search-es `path`; None if no rule
  matches. Errors name the rule, the leaf and the shape."""
  for pattern, spec in rules:
    if not re.search(pattern, path):
      continue
    spec = tuple(spec)
    if len(spec) > len(shape):
      raise ValueError(f"config.mesh.rules: ({pattern!r}, {spec}) has more entries than "
                       f"{path} has axes (shape {tuple(shape)})")
    for dim, axes in zip(shape, spec):
      names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      unknown = [a for a in names if a not in mesh.shape]
      if unknown:
        raise ValueError(f"config.mesh.rules: ({pattern!r}, {spec}) names mesh axes "
                         f"{unknown}; the mesh has {list(mesh.shape)}")
      size = int(np.prod([mesh.shape[a] for a in names], dtype=np.int64))
      if dim % size:
        raise ValueError(f"config.mesh.rules: ({pattern!r}, {spec}) splits an axis of size "
                         f"{dim} of {path} (shape {tuple(shape)}) over {size} devices")
    return P(*spec)
  return None


def state_shardings(mesh: Mesh, abstract_state, mesh_cfg):
  """NamedShardings for a (train-)state pytree of ShapeDtypeStructs: the first matching
  `mesh_cfg.rules` (regex → spec, big_vision style) or else `fsdp_spec`. Rules match
  the leaf's path, so a parameter's EMA copy and optimizer moments ('opt_state/0/mu/
  blocks_3/attn/qkv/kernel') get the parameter's sharding."""
  fsdp = mesh.shape["fsdp"]
  rules = tuple(getattr(mesh_cfg, "rules", ()) or ())

  def one(path, x):
    spec = rule_spec(leaf_path(path), x.shape, rules, mesh)
    if spec is None:
      spec = fsdp_spec(x.shape, fsdp, mesh_cfg.fsdp_min_size)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, abstract_state)


def host_to_global(local_batch, mesh: Mesh):
  """This host's slice of the batch (numpy pytree) → global jax.Arrays on the mesh.

  Hosts' slices are concatenated in process order, which is what
  `data.make_train_iterator` produces.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def to_host(x):
  """A global (possibly multi-host) array → the full numpy array on every host."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---------------------------------------------------------------------------------
# The pmap path: the same step body, one program per device.

def pmap_step(step_body, axis_name: str = "batch", devices=None):
  """Compiles step_body(state, batch, key, axis_name=...) with jax.pmap (over
  `devices`, default every local device).

  state is replicated (leading device axis), batch is split [n_devices, b, ...], the
  key is shared. The body averages gradients with lax.pmean over `axis_name`.
  """
  return jax.pmap(lambda s, b, k: step_body(s, b, k, axis_name=axis_name),
                  axis_name=axis_name, in_axes=(0, 0, None), donate_argnums=(0,),
                  devices=devices)


def split_for_pmap(local_batch, n_devices: int | None = None):
  n = n_devices or jax.local_device_count()
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), local_batch)


def replicate(tree, n_devices: int | None = None):
  """Stacks a copy per local device (pmap shards the leading axis over devices). On the
  host, in numpy: a jnp op per leaf would compile one program per parameter shape."""
  n = n_devices or jax.local_device_count()
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def unreplicate(tree):
  """The first device's copy of every leaf of a pmap output (numpy), read from its
  shard rather than indexed (indexing would compile a program per leaf)."""
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_shards[0].data)[0]
    return np.asarray(x)[0]
  return jax.tree.map(first, tree)
