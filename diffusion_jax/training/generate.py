"""Sharded generation of N samples: pad N to the device count, run the compiled
sampler with the batch split over the mesh, gather on every host.

Sample i is drawn from key fold_in(key, i) with label labels[i], so the images do not
depend on N, the batch padding, or how many devices or hosts run it.
"""
from __future__ import annotations

import jax
import numpy as np

from diffusion_jax import checkpoint, config as config_lib, data, parallel
from diffusion_jax.training import tasks


def compile_sampler(sample_fn):
  """jit of (params, labels [N], indices [N], key) -> images, keys derived per index."""
  def run(params, labels, indices, key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    images, _ = sample_fn(params, labels, keys)
    return images
  return jax.jit(run)


def generate(compiled, params, labels: np.ndarray, key, mesh) -> np.ndarray:
  """labels int [N] → images float32 [N, H, W, C] in [-1, 1] (numpy, on every host)."""
  n = len(labels)
  n_dev = mesh.devices.size
  padded = -(-n // n_dev) * n_dev
  labels = np.concatenate([labels, np.zeros(padded - n, labels.dtype)]).astype(np.int32)
  indices = np.arange(padded, dtype=np.int32)
  sharding = parallel.batch_sharding(mesh)
  put = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
  images = compiled(params, put(labels), put(indices), key)
  return parallel.to_host(images)[:n]


def class_grid_labels(num_classes: int, per_class: int) -> np.ndarray:
  """One row per class: [0]*per_class + [1]*per_class + ... (unconditional: 8×8 zeros)."""
  if not num_classes:
    return np.zeros(64, np.int32)
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def load_run(workdir: str, step: int | None = None, mesh=None):
  """Restores a run written by the train loop: (config, info, state, mesh, step).

  The config and dataset info come from the checkpoint itself, so this needs neither
  the config file nor the dataset.
  """
  mngr = checkpoint.manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  meta = checkpoint.read_meta(mngr, step)
  config = config_lib.from_json(meta["config"])
  info = data.DatasetInfo(image_shape=tuple(meta["dataset"]["image_shape"]),
                          num_classes=meta["dataset"]["num_classes"], num_examples=0)
  mesh = parallel.make_mesh(config_lib.base().mesh) if mesh is None else mesh
  task = tasks.get(config.task)
  abstract = jax.eval_shape(lambda k: task.init(config, k, info), jax.random.key(0))
  shardings = parallel.state_shardings(mesh, abstract, config.mesh)
  state, _, _ = checkpoint.restore(mngr, step, abstract, shardings)
  mngr.close()
  return config, info, state, mesh, step


def resolve_labels(info, num_samples: int, labels=None) -> np.ndarray:
  """Labels for N samples: the given ones cycled to N, else 0..C−1 cycled; zeros for
  unconditional models (where giving labels is an error)."""
  if not info.num_classes:
    if labels:
      raise ValueError("labels were given, but this model is unconditional")
    return np.zeros(num_samples, np.int32)
  pool = [int(l) for l in labels] if labels else list(range(info.num_classes))
  bad = [l for l in pool if not 0 <= l < info.num_classes]
  if bad:
    raise ValueError(f"labels {bad} out of range for {info.num_classes} classes")
  return np.resize(np.asarray(pool, np.int32), num_samples)


def sample_run(workdir: str, num_samples: int, labels=None, *, seed: int = 0, sampler=None,
               num_steps=None, guidance=None, step=None, use_ema: bool = True):
  """Samples a trained run → (images float [N,H,W,C] in [-1, 1], labels int [N], info,
  checkpoint step). Labels as in `resolve_labels`."""
  config, info, state, mesh, step = load_run(workdir, step)
  labels = resolve_labels(info, num_samples, labels)
  sample_fn = tasks.get(config.task).sample(config, info, sampler=sampler,
                                             num_steps=num_steps, guidance=guidance)
  params = state.ema_params if use_ema else state.params
  images = generate(compile_sampler(sample_fn), params, labels, jax.random.key(seed), mesh)
  return images, labels, info, step
