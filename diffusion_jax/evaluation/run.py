"""Evaluating a trained run: generate N samples sharded over every device and host,
batch by batch, push them through the feature networks inside the same compiled call,
and stream the features into the metrics of `metrics.py` (`diffusion-jax-evaluate`,
and the training loop every `config.eval.every` steps).

- Feature networks: a run of the classifier task trained on clean images (the *domain*
  network; `configs/digits_classifier.py --config.classifier.noise_conditional=False`),
  numbers labelled `*_domain`; and the FID Inception-v3 (`nets/inception.py`, from the
  pytorch-fid weight file the user points at), labelled `*_inception` (fd_inception
  is FID).
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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax import data, parallel, samplers, writers
from diffusion_jax.diffusion import likelihood, paths, predictions
from diffusion_jax.evaluation import metrics as metrics_lib
from diffusion_jax.data import text as text_lib
from diffusion_jax.nets import clip as clip_net, inception
from diffusion_jax.training import generate, tasks

METRICS = ("fd", "kid", "pr", "acc", "is", "clip_score", "bpd_vlb", "bpd_ode")
_SAMPLE_METRICS = ("fd", "kid", "pr", "acc", "is", "clip_score")


def feature_network(feature_workdir: str, mesh):
  """(features(params, x) -> (logits, feats), params, info, config) of a classifier run."""
  config, info, state, _, _ = generate.load_run(feature_workdir, mesh=mesh)
  if config.task != "classifier":
    raise ValueError(f"--feature_workdir={feature_workdir} is a {config.task!r} run; the "
                     "feature network must be a run of the 'classifier' task")
  return tasks.get("classifier").features_fn(config, info), state.ema_params, info, config


class FeatureNet(NamedTuple):
  """A feature network: fn(params, images [B,H,W,C] in [-1, 1]) -> (logits, features)."""
  fn: Callable
  params: Any
  stats_dir: str        # where reference statistics of real splits are cached
  source: str           # the classifier run or weight file it came from
  text_fn: Callable | None = None  # clip: captions [N] -> L2-normalised embeddings [N, D]


def _inception_features(variables, images):
  """FID Inception-v3 (logits [B, 1008], pool [B, 2048]) of images in [-1, 1]; grayscale
  images are repeated to RGB, as FID tools do for MNIST-like data."""
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  pool, logits = inception.InceptionV3().apply(variables, images)
  return logits, pool


def _clip_image_features(clip_config):
  def fn(params, images):
    emb = clip_net.encode_image(clip_config, params, images)
    return jnp.zeros((images.shape[0], 1), jnp.float32), emb
  return fn


def feature_networks(info, workdir, mesh, *, feature_workdir=None, inception_weights=None,
                     ref_stats_dir=None, clip_workdir=None) -> dict[str, FeatureNet]:
  """The feature networks the sample metrics are computed in, by label: 'domain' (a
  classifier run; reference stats in `<feature_workdir>/ref_stats/`), 'inception'
  (the FID Inception-v3 from a pytorch-fid `.pth` or converted `.npz`; reference stats
  in `ref_stats_dir`, default `<workdir>/eval/ref_stats/`) and 'clip' (a clip run's
  L2-normalised image embeddings, for clip_score and fd_clip; reference stats in
  `<clip_workdir>/ref_stats/`)."""
  nets = {}
  if clip_workdir:
    clip_config, c_info, c_state, _, _ = generate.load_run(clip_workdir, mesh=mesh)
    if clip_config.task != "clip":
      raise ValueError(f"--clip_workdir={clip_workdir} is a {clip_config.task!r} run, not a "
                       "run of the 'clip' task")
    if tuple(c_info.image_shape) != tuple(info.image_shape):
      raise ValueError(f"the clip run {clip_workdir} takes {tuple(c_info.image_shape)} "
                       f"images; the model makes {tuple(info.image_shape)}")
    text_params = jax.device_get(c_state.ema_params)
    encode = jax.jit(lambda p, t: clip_net.encode_text(clip_config, p, t)[2])
    text_fn = lambda captions: np.asarray(encode(text_params, text_lib.encode(
        captions, clip_config.text.max_length)), np.float64)
    nets["clip"] = FeatureNet(_clip_image_features(clip_config), c_state.ema_params,
                              os.path.join(clip_workdir, "ref_stats"),
                              os.path.abspath(clip_workdir), text_fn)
  if feature_workdir:
    fn, params, f_info, _ = feature_network(feature_workdir, mesh)
    if tuple(f_info.image_shape) != tuple(info.image_shape):
      raise ValueError(f"the feature network {feature_workdir} takes "
                       f"{tuple(f_info.image_shape)} images; the model makes "
                       f"{tuple(info.image_shape)}")
    nets["domain"] = FeatureNet(fn, params, os.path.join(feature_workdir, "ref_stats"),
                                os.path.abspath(feature_workdir))
  if inception_weights:
    if info.image_shape[-1] not in (1, 3):
      raise ValueError(f"Inception features need 1- or 3-channel images, the model makes "
                       f"{tuple(info.image_shape)}")
    variables = jax.device_put(inception.load_weights(inception_weights),
                               parallel.replicated(mesh))
    nets["inception"] = FeatureNet(
        _inception_features, variables,
        os.path.join(ref_stats_dir or os.path.join(workdir, "eval", "ref_stats"), "inception"),
        os.path.abspath(inception_weights))
  return nets


def _features_of_arrays(features, params, images, mesh, batch: int):
  """Features [N, D] of images [N, H, W, C] (numpy), batch by batch, sharded."""
  fn = jax.jit(lambda p, x: features(p, x)[1])
  out = []
  for i in range(0, len(images), batch):
    x = images[i:i + batch]
    padded = parallel.padded_size(len(x), mesh)
    out.append(parallel.to_host(fn(params, parallel.shard_padded(x, padded, mesh)))[:len(x)])
  return np.concatenate(out).astype(np.float64)


def reference_stats(features, params, stats_dir, data_name, split, mesh, *,
                    data_dir=None, image_size=None, batch: int = 256) -> dict:
  """{'mu', 'sigma', 'features'} of a real split under the feature network, cached as
  `<stats_dir>/<data_name>_<split>[_<size>].npz` (the domain network's stats_dir:
  `<feature_workdir>/ref_stats`)."""
  tag = f"{data_name}_{split}".replace("/", "_").replace("[", "_").replace("]", "").replace(":", "-")
  path = os.path.join(stats_dir, tag + (f"_{image_size}" if image_size else "") + ".npz")
  if os.path.exists(path):  # (mu and sigma only: a file from another FID tool)
    with np.load(path) as f:
      return {"mu": f["mu"], "sigma": f["sigma"], "path": path,
              "features": f["features"] if "features" in f.files else None}
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
  return {**stats, "path": path}


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
  ncls = task.null_label(config, info)
  dims = int(np.prod(info.image_shape))

  def one(params, x, key):
    """Bits/dim of one image x [H,W,C] from its own key (vmapped over the batch)."""
    x, label = x[None], jnp.full((1,), ncls, jnp.int32)  # ∅ (0: unconditional)
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


def _compile(sample_fn, nets):
  """jit of (params, cond, indices, key, {name: f_params}) -> {name: (logits, features)}
  of the samples: images never leave the devices."""
  def run(params, cond, indices, key, f_params):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    images, _ = sample_fn(params, cond, keys)
    return {name: net.fn(f_params[name], images) for name, net in nets.items()}
  return jax.jit(run)


def _settings_hash(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def evaluate(workdir: str, feature_workdir: str | None = None, *, step=None,
             use_ema: bool = True, mesh=None, max_batches: int | None = None,
             **settings) -> dict | None:
  """Evaluates the checkpoint `step` (default: latest) of the run in workdir; writes
  `<workdir>/eval/<step>.json`, TensorBoard scalars and eval/metrics.jsonl, and returns
  the results. settings: those of `make_evaluator` (defaults: the run's config.eval).
  max_batches: stop generating after this many batches, keeping the partial state for
  a later call (time-boxed or preemptible jobs); returns None then. The workdir must
  be visible to every host.
  """
  config, info, state, mesh, step = generate.load_run(workdir, step, mesh=mesh)
  evaluator = make_evaluator(config, info, workdir, mesh, feature_workdir=feature_workdir,
                             use_ema=use_ema, **settings)
  return evaluator(step, state.ema_params if use_ema else state.params,
                   max_batches=max_batches)


def make_evaluator(config, info, workdir: str, mesh, *, metrics=None, num_samples=None,
                   batch_size=None, seed=None, sampler=None, num_steps=None, guidance=None,
                   feature_workdir=None, inception_weights=None, ref_stats_dir=None,
                   clip_workdir=None, reference_split=None, floor_split=None, data_dir=None,
                   likelihood_images=None, likelihood_steps=None, use_ema: bool = True):
  """evaluate(step, params, *, max_batches=None, extra=None) -> results | None for a run
  of `config` writing to `<workdir>/eval/`. Every setting left None comes from
  config.eval (sampler, num_steps, guidance: from config.sample). The feature network,
  the compiled sampler and the reference statistics are built once, so the training
  loop can call it every `config.eval.every` steps. extra: numbers recorded beside the
  results (the loop's training wall time).

  Sample metrics (fd, kid, pr, acc, is) need a feature network: `feature_workdir` (a
  classifier run: `*_domain` numbers) and/or `inception_weights` (FID Inception-v3:
  `*_inception`, so fd_inception is FID); samples are labelled 0..C−1 cycled.
  clip_score: 100 · E max(cos(image embedding, caption embedding), 0) under a clip run
  (`clip_workdir`, default config.eval.clip_workdir, else the model's own
  config.text.clip_workdir), sample i captioned by its label (the digit caption,
  template 0), beside `clip_score_real` of the reference split's real images.
  bpd_vlb, bpd_ode: bits/dim of the first `likelihood_images` images of the reference
  split (`bits_per_dim`).
  """
  e = config.eval
  pick = lambda v, d: d if v is None else v
  metrics = tuple(pick(metrics, e.metrics))
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise ValueError(f"unknown metrics {unknown}: expected some of {list(METRICS)}")
  task = tasks.get(config.task)
  if not hasattr(task, "sample"):
    raise ValueError(f"{workdir} holds a {config.task!r} run, which does not generate")
  n_dev = mesh.devices.size
  batch_size = max(n_dev, pick(batch_size, e.batch_size) // n_dev * n_dev)
  s = dict(metrics=metrics, num_samples=pick(num_samples, e.num_samples), batch_size=batch_size,
           seed=pick(seed, e.seed), sampler=pick(sampler, config.sample.sampler),
           num_steps=pick(num_steps, config.sample.num_steps),
           guidance=pick(guidance, config.sample.guidance),
           reference_split=pick(reference_split, e.reference_split),
           floor_split=pick(floor_split, e.floor_split), use_ema=use_ema,
           likelihood_images=pick(likelihood_images, e.likelihood_images),
           likelihood_steps=pick(likelihood_steps, e.likelihood_steps))
  ds = dict(data_dir=data_dir or config.data.data_dir, image_size=config.data.image_size or None)
  sample_metrics = None
  if any(m in _SAMPLE_METRICS for m in metrics):
    clip_workdir = pick(clip_workdir, e.clip_workdir or (
        config.text.clip_workdir if config.text.encoder == "clip" else None))
    if "clip_score" in metrics and not clip_workdir:
      raise ValueError("metric clip_score needs a clip run: --clip_workdir "
                       "(config.eval.clip_workdir)")
    nets = feature_networks(info, workdir, mesh,
                            feature_workdir=pick(feature_workdir, e.feature_workdir),
                            inception_weights=pick(inception_weights, e.inception_weights),
                            ref_stats_dir=pick(ref_stats_dir, e.ref_stats_dir),
                            clip_workdir=clip_workdir if "clip_score" in metrics else None)
    if not nets:
      raise ValueError(f"metrics {[m for m in metrics if m in _SAMPLE_METRICS]} need a "
                       "feature network: --feature_workdir (config.eval.feature_workdir, a "
                       "classifier run) and/or --inception_weights "
                       "(config.eval.inception_weights, FID Inception-v3 weights)")
    sample_metrics = _sample_metrics_fn(config, info, task, workdir, nets, s, ds, mesh)

  likelihood_images = None
  if {"bpd_vlb", "bpd_ode"} & set(metrics):  # loaded once, not at every evaluation
    likelihood_images = data.load_arrays(config.data.name, s["reference_split"],
                                         ds["data_dir"], image_size=ds["image_size"])[0]
    likelihood_images = likelihood_images[:s["likelihood_images"]]

  def evaluate_fn(step: int, params, *, max_batches=None, extra=None):
    results = {"checkpoint_step": step, "seed": s["seed"],
               "reference": f"{config.data.name}:{s['reference_split']}", **(extra or {})}
    if sample_metrics is not None:
      sample_results = sample_metrics(step, params, max_batches)
      if sample_results is None:
        return None
      results.update(sample_results)
    for m in ("bpd_vlb", "bpd_ode"):
      if m in metrics:
        bpd = bits_per_dim(config, info, params, likelihood_images, mesh,
                           method=m[4:], num_steps=s["likelihood_steps"], seed=s["seed"],
                           batch=batch_size)
        results[m] = float(np.mean(bpd))
        results[m + "_stderr"] = float(np.std(bpd) / np.sqrt(len(bpd)))
        results["likelihood_images"] = len(bpd)
        results["likelihood_steps"] = s["likelihood_steps"]
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

  return evaluate_fn


def _sample_metrics_fn(config, info, task, workdir, nets, s, ds, mesh):
  """The sample-quality part of the evaluator: (step, params, max_batches) -> results.
  Generation → features of every network in one compiled call, resumable batch by
  batch."""
  settings = {k: s[k] for k in ("num_samples", "batch_size", "seed", "sampler", "num_steps",
                                "guidance", "use_ema")}
  settings["feature_networks"] = {name: net.source for name, net in nets.items()}
  metrics, num_samples, batch_size = s["metrics"], s["num_samples"], s["batch_size"]
  eval_dir = os.path.join(workdir, "eval")
  # Conditional samples, class by class: class-conditional models get labels, text
  # models on labelled data the captions of those labels (`task.conditioning`).
  ncls = task.num_classes(config, info) or (info.num_classes if config.text.encoder else 0)
  labels_all = (np.arange(num_samples) % max(ncls, 1)).astype(np.int32)
  compiled = _compile(task.sample(config, info, sampler=s["sampler"],
                                  num_steps=s["num_steps"], guidance=s["guidance"]), nets)
  f_params = {name: net.params for name, net in nets.items()}
  key = jax.random.key(s["seed"])
  refs = {}

  def ref(name, split):
    if (name, split) not in refs:
      net = nets[name]
      refs[name, split] = reference_stats(net.fn, net.params, net.stats_dir, config.data.name,
                                          split, mesh, **ds)
    return refs[name, split]

  def sample_metrics(step, params, max_batches):
    partial = os.path.join(eval_dir, f"partial_{step}_{_settings_hash(settings)}.npz")
    done, acc = 0, {f"{n}_{k}": [] for n in nets for k in ("features", "logits")}
    if os.path.exists(partial):
      with np.load(partial) as f:
        done = int(f["done"])
        acc = {k: [f[k]] for k in acc}
      logging.info("Resuming evaluation from %s (%d of %d samples)", partial, done, num_samples)
    batches = 0
    while done < num_samples:
      if max_batches is not None and batches == max_batches:
        return None
      n = min(batch_size, num_samples - done)
      cond = task.conditioning(config, info, labels_all[done:done + n])
      out = generate.generate(compiled, params, cond, key, mesh, f_params, offset=done)
      for name, (lg, ft) in out.items():
        if not np.all(np.isfinite(ft)):
          raise FloatingPointError(f"non-finite {name} features for samples "
                                   f"{done}..{done + n - 1} (sampler {s['sampler']!r})")
        acc[f"{name}_features"].append(ft.astype(np.float32))
        acc[f"{name}_logits"].append(lg.astype(np.float32))
      done += n
      batches += 1
      if jax.process_index() == 0:
        os.makedirs(eval_dir, exist_ok=True)
        tmp = partial + ".tmp.npz"
        np.savez(tmp, done=done, **{k: np.concatenate(v) for k, v in acc.items()})
        os.replace(tmp, partial)

    results = {"num_samples": num_samples, "sampler": s["sampler"],
               "num_steps": s["num_steps"], "guidance": s["guidance"],
               "feature_networks": settings["feature_networks"],
               "floor": f"{config.data.name}:{s['floor_split']} vs "
                        f"{config.data.name}:{s['reference_split']}"}
    for name, net in nets.items():
      feats = np.concatenate(acc[f"{name}_features"]).astype(np.float64)
      logits = np.concatenate(acc[f"{name}_logits"])
      results.update(_metrics_of(name, feats, logits, labels_all, ncls, metrics,
                                 lambda split: ref(name, split), s))
      if net.text_fn is not None:
        results.update(_clip_scores(net, feats, labels_all, ncls, ref, s, config, ds))
    if jax.process_index() == 0 and os.path.exists(partial):
      os.remove(partial)
    return results

  return sample_metrics


def _clip_scores(net, feats, labels, ncls, ref, s, config, ds) -> dict:
  """clip_score of samples (feats: their clip image embeddings [N, D], captioned by
  their labels) and clip_score_real of the reference split's real images."""
  if not ncls or config.data.name not in data.builders.EMBEDDED or config.data.name == "ring8":
    raise ValueError("clip_score captions samples by their labels (the embedded digit "
                     f"datasets' captions): config.data.name={config.data.name!r}"
                     f"{' is unconditional' if not ncls else ''} has none")
  text = net.text_fn([text_lib.digit_caption(c, 0) for c in range(ncls)])  # [C, D]
  score = lambda f, y: float(100 * np.mean(np.maximum(np.sum(f * text[y], axis=1), 0.0)))
  real = ref("clip", s["reference_split"])["features"]
  real_labels = data.load_arrays(config.data.name, s["reference_split"], ds["data_dir"],
                                 image_size=ds["image_size"])[1]
  return {"clip_score": score(feats, labels),
          "clip_score_real": score(np.asarray(real, np.float64), real_labels)}


def _metrics_of(name, feats, logits, labels, ncls, metrics, ref, s) -> dict:
  """Sample metrics of features [N, D] and logits [N, K] in one feature network's
  space, keyed `<metric>_<name>`; ref(split) -> that split's reference statistics."""
  out = {}
  reference = ref(s["reference_split"])
  floor = ref(s["floor_split"]) if {"fd", "kid"} & set(metrics) else None
  for r in (reference, floor):
    if r is not None and r["features"] is None and {"kid", "pr"} & set(metrics):
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
  if "is" in metrics and name != "clip":  # the clip net has no class logits
    out[f"is_{name}"], out[f"is_{name}_std"] = metrics_lib.inception_score(logits)
  if "acc" in metrics and ncls and name == "domain":
    pred = np.argmax(logits, axis=1)
    out[f"acc_{name}"] = float(np.mean(pred == labels))
    out[f"acc_{name}_per_class"] = [float(np.mean(pred[labels == c] == c)) for c in range(ncls)]
  return out
