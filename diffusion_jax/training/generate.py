"""Sharded generation of N samples: pad N to the device count, run the compiled
sampler with the batch split over the mesh, gather on every host.

Sample i is drawn from key fold_in(key, i) with label labels[i], so the images do not
depend on N, the batch padding, or how many devices or hosts run it.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from diffusion_jax import parallel, runs
from diffusion_jax.training import tasks
from diffusion_jax.training.tasks.base import Generator

__all__ = ["compile_sampler", "generate", "generator_of", "resolve_labels", "sample_run"]


def compile_sampler(sample_fn, frozen=None):
  """jit of (params, cond, indices [N], key, *extra) -> images, keys derived per index.
  frozen: a generator's frozen component parameters (`Generator.frozen`), given to
  sample_fn as `frozen=` and to the compiled program as an argument (not a constant)."""
  def run(params, frozen, cond, indices, key, *extra):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    kw = {} if frozen is None else {"frozen": frozen}
    images, _ = sample_fn(params, cond, keys, *extra, **kw)
    return images
  if frozen is None:  # the jitted function itself (callers may .lower() it)
    return jax.jit(lambda params, cond, indices, key, *extra: run(params, None, cond, indices,
                                                                 key, *extra))
  jitted = jax.jit(run)
  return lambda params, cond, indices, key, *extra: jitted(params, frozen, cond, indices,
                                                           key, *extra)


def generate(compiled, params, cond: dict, key, mesh, *extra, offset: int = 0):
  """cond: per-example numpy arrays [N, ...] ("label" always) → images float32
  [N, H, W, C] in [-1, 1] (numpy, on every host; or whatever pytree of [N, ...] arrays
  `compiled` returns). extra: further arguments of the compiled function (classifier
  parameters). offset: the global index of cond's first example (sample i uses key
  fold_in(key, offset + i)), so a long run can be generated batch by batch."""
  n = len(cond["label"])
  padded = parallel.padded_size(n, mesh)
  as_jax = lambda v: np.asarray(v, np.int32 if np.issubdtype(np.asarray(v).dtype, np.integer)
                                else np.float32)  # labels, tokens | images, embeddings
  cond = {k: parallel.shard_padded(as_jax(v), padded, mesh) for k, v in cond.items()}
  indices = parallel.shard_padded(offset + np.arange(padded, dtype=np.int32), padded, mesh)
  out = compiled(params, cond, indices, key, *extra)
  return jax.tree.map(lambda a: parallel.to_host(a)[:n], out)


def resolve_labels(num_classes: int, num_samples: int, labels=None) -> np.ndarray:
  """Labels for N samples of a model conditioned on `num_classes` classes: the given
  ones cycled to N, else 0..C−1 cycled; zeros for unconditional models (where giving
  labels is an error)."""
  if not num_classes:
    if labels:
      raise ValueError("labels were given, but this model is unconditional")
    return np.zeros(num_samples, np.int32)
  pool = [int(l) for l in labels] if labels else list(range(num_classes))
  bad = [l for l in pool if not 0 <= l < num_classes]
  if bad:
    raise ValueError(f"labels {bad} out of range for {num_classes} classes")
  return np.resize(np.asarray(pool, np.int32), num_samples)


def generator_of(comp: runs.Component) -> Generator:
  """The Generator capability of a loaded run, or an error naming what it is."""
  task = tasks.make(comp.config, comp.info)
  if task.generator is None:
    raise ValueError(f"{comp.workdir} holds a config.task={comp.config.task!r} run, which "
                     "generates nothing")
  return task.generator


def sample_run(workdir: str, num_samples: int, labels=None, *, seed: int = 0, sampler=None,
               num_steps=None, guidance=None, step=None, use_ema: bool = True, inputs=None,
               inpaint=None, strength: float = 1.0, classifier_workdir: str | None = None,
               classifier_scale: float = 1.0, prompts=None, mesh=None, adapters=(),
               lora_scale=None):
  """Samples a trained run → (images float [N,H,W,C] in [-1, 1], labels int [N] (−1
  when samples are not conditioned on classes), the run as a `runs.Component`).
  Labels as in `resolve_labels`.

  inputs: images float [M, h, w, C] in [-1, 1], cycled to N; inpaint: a region name or
  mask; prompts: captions — all three go to the run's `Generator.conditioning`, which
  says what they mean for it (SDEdit / inpainting sources, a super-resolution model's
  low-resolution input, captions of a text-conditional model). strength: SDEdit's t₀
  (1 = from pure noise). classifier_workdir, classifier_scale: classifier guidance by
  a run that provides a `Guide` (the classifier task) for this run's path and data.
  adapters: [(adapter file, weight), ...] loaded onto a diffusion run (LoRA adapters
  composed with their weights, placeholder embeddings: `finetune.attach`); lora_scale:
  the s of W + (α/r)·s·BA of a LoRA run or of the attached adapters (None: the run's
  config.sample.lora_scale).
  """
  comp = runs.load(workdir, step=step, params="ema" if use_ema else "raw", mesh=mesh)
  if adapters:
    from diffusion_jax.training.tasks import finetune
    config, params = finetune.attach(comp.config, comp.params, adapters)
    replicated = jax.sharding.NamedSharding(comp.mesh, jax.sharding.PartitionSpec())
    params = dict(params, **{k: jax.device_put(v, replicated) for k, v in params.items()
                             if k != "denoiser"})
    comp = dataclasses.replace(comp, config=config, params=params)
  gen = generator_of(comp)
  n, ncls = num_samples, gen.num_classes
  classifier, extra = None, ()
  if classifier_workdir:
    guide_run = runs.load(classifier_workdir, mesh=comp.mesh)
    guide = tasks.make(guide_run.config, guide_run.info).guide
    if guide is None:
      raise ValueError(f"cannot guide with {classifier_workdir}: it is a config.task="
                       f"{guide_run.config.task!r} run, which provides no classifier guidance")
    classifier, extra = (guide, classifier_scale), (guide_run.params,)
    ncls = ncls or guide.num_classes  # an unconditional model guided towards labels
  labels = resolve_labels(ncls, n, labels)
  cond = gen.conditioning(labels, prompts=prompts, images=inputs, mask=inpaint)
  sample_fn = gen.sample(sampler=sampler, num_steps=num_steps, guidance=guidance,
                         strength=strength, classifier=classifier,
                         **({} if lora_scale is None else {"lora_scale": lora_scale}))
  images = generate(compile_sampler(sample_fn, gen.frozen), comp.params, cond,
                    jax.random.key(seed), comp.mesh, *extra)
  if not np.all(np.isfinite(images)):
    bad = int(np.sum(~np.all(np.isfinite(images.reshape(n, -1)), axis=1)))
    raise FloatingPointError(
        f"{bad} of {n} samples are not finite (sampler "
        f"{sampler or comp.config.sample.sampler!r}, "
        f"{num_steps or comp.config.sample.num_steps} steps, checkpoint step {comp.step}); "
        "nothing was written")
  return images, (labels if ncls else np.full(n, -1, np.int32)), comp
