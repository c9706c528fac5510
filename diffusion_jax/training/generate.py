"""Sharded generation of N samples: pad N to the device count, run the compiled
sampler with the batch split over the mesh, gather on every host.

Sample i is drawn from key fold_in(key, i) with label labels[i], so the images do not
depend on N, the batch padding, or how many devices or hosts run it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parallel


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
