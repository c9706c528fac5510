"""Evaluating a trained run: generate N samples sharded over every device and host,
batch by batch, push them through a feature network inside the same compiled call,
and stream the features into the metrics of `metrics.py` (`diffusion-jax-evaluate`).

- Feature network: a run of the classifier task trained on clean images (the *domain*
  network; `configs/digits_classifier.py --config.classifier.noise_conditional=False`).
  Its numbers are labelled `*_domain`: they are not Inception FID.
- Reference statistics of a dataset split (μ, Σ as `mu`, `sigma`, the layout of the
  pytorch-fid `.npz` files, plus the feature vectors for KID and precision/recall) are
  computed once per feature network and cached under `<feature_workdir>/ref_stats/`.
- The data floor: the same distances between two real splits (train vs the reference
  split), reported beside each number.
- Resumable: after every batch the running state (moments, features, next batch) is
  written to `<workdir>/eval/partial_<step>_<settings hash>.npz`; a rerun with the same
  settings continues from it. Sample i depends only on (seed, i), so an interrupted
  evaluation ends with the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax import data, parallel, samplers, writers
from diffusion_jax.diffusion import likelihood, paths, predictions
from diffusion_jax.evaluation import metrics as metrics_lib
from diffusion_jax.training import generate, tasks

METRICS = ("fd", "kid", "pr", "acc", "is", "bpd_vlb", "bpd_ode")
_SAMPLE_METRICS = ("fd", "kid", "pr", "acc", "is")


def feature_network(feature_workdir: str, mesh):
  """(features(params, x) -> (logits, feats), params, info, config) of a classifier run."""
  config, info, state, _, _ = generate.load_run(feature_workdir, mesh=mesh)
  if config.task != "classifier":
    raise ValueError(f"--feature_workdir={feature_workdir} is a {config.task!r} run; the "
                     "feature network must be a run of the 'classifier' task")
  return tasks.get("classifier").features_fn(config, info), state.ema_params, info, config


def _features_of_arrays(features, params, images, mesh, batch: int):
  """Features [N, D] of images [N, H, W, C] (numpy), batch by batch, sharded."""
  fn = jax.jit(lambda p, x: features(p, x)[1])
  out = []
  for i in range(0, len(images), batch):
    x = images[i:i + batch]
    padded = parallel.padded_size(len(x), mesh)
    out.append(parallel.to_host(fn(params, parallel.shard_padded(x, padded, mesh)))[:len(x)])
  return np.concatenate(out).astype(np.float64)


def reference_stats(features, params, feature_workdir, data_name, split, mesh, *,
                    data_dir=None, image_size=None, batch: int = 256) -> dict:
  """{'mu', 'sigma', 'features'} of a real split under the feature network, cached as
  `<feature_workdir>/ref_stats/<data_name>_<split>[_<size>].npz`."""
  tag = f"{data_name}_{split}".replace("/", "_").replace("[", "_").replace("]", "").replace(":", "-")
  path = os.path.join(feature_workdir, "ref_stats", tag + (f"_{image_size}" if image_size else "") + ".npz")
  if os.path.exists(path):
    with np.load(path) as f:
      return {k: f[k] for k in ("mu", "sigma", "features")}
  images, _ = data.load_arrays(data_name, split, data_dir, image_size=image_size)
  feats = _features_of_arrays(features, params, images, mesh, batch)
  m = metrics_lib.Moments.zeros(feats.shape[1]).update(feats)
  mu, sigma = m.mean_cov()
  stats = {"mu": mu, "sigma": sigma, "features": feats.astype(np.float32)}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **stats)
    os.replace(tmp, path)
  return stats


def bits_per_dim(config, info, params, images, mesh, *, method: str, num_steps: int,
                 seed: int = 0, batch: int = 256) -> np.ndarray:
  """Bits/dim [N] of 8-bit images [N,H,W,C] in [-1, 1] under a diffusion model:
  'vlb' — the DDPM bound with the discretised decoder (docs/likelihood.md), summed
  exactly over the grid (a discrete path's own T steps; a continuous path's
  `geometric_grid(num_steps)`); 'ode' — the PF-ODE (RK4, num_steps, Hutchinson
  divergence) of uniformly dequantised data, + D·log 127.5 nats for the 8-bit bins.
  Class-conditional models are scored as p(x) through the null class. Example i uses
  key fold_in(key(seed), i): independent of batch and device count."""
  task = tasks.get(config.task)
  net = task.network_fn(config, info)
  path, prediction = paths.from_config(config.diffusion), config.diffusion.prediction
  ncls = task.num_classes(config, info)
  dims = int(np.prod(info.image_shape))

  def one(params, x, key):
    """Bits/dim of one image x [H,W,C] from its own key (vmapped over the batch)."""
    x, label = x[None], jnp.full((1,), ncls, jnp.int32)  # the null class (0: unconditional)
    if method == "vlb":
      x0_fn = lambda x_t, t: predictions.to_x0_eps(path, prediction, net(params, x_t, t, label),
                                                   x_t, t)[0]
      grid = None if path.discrete else likelihood.geometric_grid(num_steps)
      nats = likelihood.vlb_terms(path, x0_fn, x, key, grid=grid)["total"]
    else:
      den = samplers.make_denoiser(lambda a, t, y: net(params, a, t, y), path, prediction, label)
      u = jax.random.uniform(jax.random.fold_in(key, 1), x.shape)
      nats = likelihood.pf_ode_nll(path, den, x + (u - 0.5) * (2.0 / 255.0), key,
                                   num_steps=num_steps) + dims * np.log(127.5)
    return likelihood.bits_per_dim(nats, dims)[0]

  def nll_bits(params, x, indices):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
    return jax.vmap(lambda xi, k: one(params, xi, k))(x, keys)

  fn = jax.jit(nll_bits)
  out = []
  for i in range(0, len(images), batch):
    x = images[i:i + batch]
    padded = parallel.padded_size(len(x), mesh)
    idx = np.arange(i, i + padded, dtype=np.int32)
    out.append(parallel.to_host(fn(params, parallel.shard_padded(x, padded, mesh),
                                   parallel.shard_padded(idx, padded, mesh)))[:len(x)])
  return np.concatenate(out)


def _compile(sample_fn, features):
  """jit of (params, cond, indices, key, f_params) -> (logits, features) of samples."""
  def run(params, cond, indices, key, f_params):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    images, _ = sample_fn(params, cond, keys)
    return features(f_params, images)
  return jax.jit(run)


def _settings_hash(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def evaluate(workdir: str, feature_workdir: str | None = None, *,
             metrics=("fd", "kid", "pr", "acc"), num_samples: int = 1000,
             batch_size: int = 256, seed: int = 0, sampler=None, num_steps=None,
             guidance=None, step=None, reference_split: str = "test",
             floor_split: str = "train", data_dir=None, use_ema: bool = True,
             likelihood_images: int = 1000, likelihood_steps: int = 100,
             mesh=None, max_batches: int | None = None) -> dict | None:
  """Evaluates the run in workdir; writes `<workdir>/eval/<step>.json`, TensorBoard
  scalars and eval/metrics.jsonl, and returns the results.

  Sample metrics (fd, kid, pr, acc, is) need `feature_workdir`; samples are labelled
  0..C−1 cycled (class-conditional models). bpd_vlb, bpd_ode: bits/dim of the first
  `likelihood_images` images of the reference split (`bits_per_dim`). max_batches:
  stop generating after this many batches, keeping the partial state for a later call
  (time-boxed or preemptible jobs); returns None then. The workdir must be visible
  to every host.
  """
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise ValueError(f"unknown metrics {unknown}: expected some of {list(METRICS)}")
  config, info, state, mesh, step = generate.load_run(workdir, step, mesh=mesh)
  task = tasks.get(config.task)
  if not hasattr(task, "sample"):
    raise ValueError(f"{workdir} holds a {config.task!r} run, which does not generate")
  params = state.ema_params if use_ema else state.params
  ds = dict(data_dir=data_dir or config.data.data_dir, image_size=config.data.image_size or None)
  n_dev = mesh.devices.size
  batch_size = max(n_dev, batch_size // n_dev * n_dev)
  results = {"checkpoint_step": step, "seed": seed,
             "reference": f"{config.data.name}:{reference_split}"}
  if any(m in _SAMPLE_METRICS for m in metrics):
    if not feature_workdir:
      raise ValueError(f"metrics {[m for m in metrics if m in _SAMPLE_METRICS]} need a "
                       "feature network (--feature_workdir, a classifier run)")
    sample_results = _sample_metrics(config, info, task, params, step, workdir,
                                     feature_workdir, metrics, num_samples, batch_size, seed,
                                     sampler, num_steps, guidance, use_ema, reference_split,
                                     floor_split, ds, mesh, max_batches)
    if sample_results is None:
      return None
    results.update(sample_results)
  for m in ("bpd_vlb", "bpd_ode"):
    if m in metrics:
      images, _ = data.load_arrays(config.data.name, reference_split, ds["data_dir"],
                                   image_size=ds["image_size"])
      bpd = bits_per_dim(config, info, params, images[:likelihood_images], mesh,
                         method=m[4:], num_steps=likelihood_steps, seed=seed, batch=batch_size)
      results[m] = float(np.mean(bpd))
      results[m + "_stderr"] = float(np.std(bpd) / np.sqrt(len(bpd)))
      results["likelihood_images"], results["likelihood_steps"] = len(bpd), likelihood_steps
  if jax.process_index() == 0:
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    with open(os.path.join(eval_dir, f"{step}.json"), "w") as f:
      json.dump(results, f, indent=2)
    writer = writers.MetricWriter(eval_dir)
    writer.write(step, {k: v for k, v in results.items()
                        if isinstance(v, float) and k != "guidance"})
    writer.close()
  return results


def _sample_metrics(config, info, task, params, step, workdir, feature_workdir, metrics,
                    num_samples, batch_size, seed, sampler, num_steps, guidance, use_ema,
                    reference_split, floor_split, ds, mesh, max_batches):
  """The sample-quality part of `evaluate` (resumable generation → features → metrics)."""
  features, f_params, f_info, _ = feature_network(feature_workdir, mesh)
  if tuple(f_info.image_shape) != tuple(info.image_shape):
    raise ValueError(f"the feature network takes {tuple(f_info.image_shape)} images; the "
                     f"model makes {tuple(info.image_shape)}")
  settings = {"num_samples": num_samples, "batch_size": batch_size, "seed": seed,
              "sampler": sampler, "num_steps": num_steps, "guidance": guidance,
              "use_ema": use_ema, "feature_workdir": os.path.abspath(feature_workdir)}
  eval_dir = os.path.join(workdir, "eval")
  partial = os.path.join(eval_dir, f"partial_{step}_{_settings_hash(settings)}.npz")

  ncls = task.num_classes(config, info) if hasattr(task, "num_classes") else info.num_classes
  labels_all = (np.arange(num_samples) % max(ncls, 1)).astype(np.int32)
  compiled = _compile(task.sample(config, info, sampler=sampler, num_steps=num_steps,
                                  guidance=guidance), features)
  key = jax.random.key(seed)

  done, feats, logits = 0, [], []
  if os.path.exists(partial):
    with np.load(partial) as f:
      done, feats, logits = int(f["done"]), [f["features"]], [f["logits"]]
    logging.info("Resuming evaluation from %s (%d of %d samples)", partial, done, num_samples)
  batches = 0
  while done < num_samples:
    if max_batches is not None and batches == max_batches:
      return None
    n = min(batch_size, num_samples - done)
    lg, ft = generate.generate(compiled, params, {"label": labels_all[done:done + n]}, key, mesh,
                               f_params, offset=done)
    if not np.all(np.isfinite(ft)):
      raise FloatingPointError(f"non-finite features for samples {done}..{done + n - 1}")
    feats.append(ft.astype(np.float32))
    logits.append(lg.astype(np.float32))
    done += n
    batches += 1
    if jax.process_index() == 0:
      os.makedirs(eval_dir, exist_ok=True)
      tmp = partial + ".tmp.npz"
      np.savez(tmp, done=done, features=np.concatenate(feats), logits=np.concatenate(logits))
      os.replace(tmp, partial)
  feats, logits = np.concatenate(feats).astype(np.float64), np.concatenate(logits)

  ref = reference_stats(features, f_params, feature_workdir, config.data.name,
                        reference_split, mesh, **ds)
  results = {"num_samples": num_samples, "sampler": sampler or config.sample.sampler,
             "num_steps": num_steps or config.sample.num_steps,
             "guidance": config.sample.guidance if guidance is None else guidance,
             "feature_network": os.path.abspath(feature_workdir),
             "floor": f"{config.data.name}:{floor_split} vs {config.data.name}:{reference_split}"}
  floor = None
  if {"fd", "kid"} & set(metrics):
    floor = reference_stats(features, f_params, feature_workdir, config.data.name,
                            floor_split, mesh, **ds)
  if "fd" in metrics:
    mu, sigma = metrics_lib.Moments.zeros(feats.shape[1]).update(feats).mean_cov()
    results["fd_domain"] = metrics_lib.frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    results["fd_domain_floor"] = metrics_lib.frechet_distance(floor["mu"], floor["sigma"],
                                                              ref["mu"], ref["sigma"])
  if "kid" in metrics:
    size = min(1000, len(ref["features"]), num_samples)
    results["kid_domain"], results["kid_domain_std"] = metrics_lib.kid(
        ref["features"], feats, subset_size=size)
    results["kid_domain_floor"], _ = metrics_lib.kid(ref["features"], floor["features"],
                                                     subset_size=size)
  if "pr" in metrics:
    results["precision_domain"], results["recall_domain"] = metrics_lib.precision_recall(
        ref["features"], feats)
  if "is" in metrics:
    results["is_domain"], results["is_domain_std"] = metrics_lib.inception_score(logits)
  if "acc" in metrics and ncls:
    pred = np.argmax(logits, axis=1)
    results["acc_domain"] = float(np.mean(pred == labels_all))
    results["acc_domain_per_class"] = [float(np.mean(pred[labels_all == c] == c))
                                       for c in range(ncls)]
  if jax.process_index() == 0 and os.path.exists(partial):
    os.remove(partial)
  return results
