"""Sharded generation of N samples: pad N to the device count, run the compiled
sampler with the batch split over the mesh, gather on every host.

Sample i is drawn from key fold_in(key, i) with label labels[i], so the images do not
depend on N, the batch padding, or how many devices or hosts run it.
"""
from __future__ import annotations

import jax
import numpy as np

from diffusion_jax import checkpoint, config as config_lib, data, parallel, samplers
from diffusion_jax.diffusion import paths
from diffusion_jax.training import tasks


def compile_sampler(sample_fn):
  """jit of (params, cond, indices [N], key, *extra) -> images, keys derived per index."""
  def run(params, cond, indices, key, *extra):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    images, _ = sample_fn(params, cond, keys, *extra)
    return images
  return jax.jit(run)


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
               num_steps=None, guidance=None, step=None, use_ema: bool = True, inputs=None,
               inpaint=None, strength: float = 1.0, classifier_workdir: str | None = None,
               classifier_scale: float = 1.0, prompts=None):
  """Samples a trained run → (images float [N,H,W,C] in [-1, 1], labels int [N], info,
  checkpoint step). Labels as in `resolve_labels`.

  inputs: images float [M, h, w, C] in [-1, 1], cycled to N. For a super-resolution
    run, the low-resolution conditioning (downsampled to config.superres.low_res when
    larger); otherwise the source images of SDEdit (strength < 1) and inpainting.
  inpaint: the region to regenerate (a name in `editing.REGIONS`) or a mask [H, W] or
    [N, H, W] (1 = keep the input's pixel).
  strength: SDEdit's t₀ (1 = start from pure noise).
  classifier_workdir, classifier_scale: classifier guidance by a run of the
    classifier task on the same path and data shape.
  prompts: captions (cycled to N) for a text-conditional run (default: each label's
    digit caption, for the embedded digit datasets).
  """
  config, info, state, mesh, step = load_run(workdir, step)
  task = tasks.get(config.task)
  if not hasattr(task, "sample"):
    raise ValueError(f"{workdir} holds a {config.task!r} run, which does not sample")
  n, shape = num_samples, tuple(info.image_shape)
  cond = task.conditioning(config, info, resolve_labels(info, n, labels), prompts)
  if inputs is not None:
    inputs = np.asarray(inputs, np.float32)
    if inputs.ndim != 4 or inputs.shape[-1] != shape[-1]:
      raise ValueError(f"input images have shape {inputs.shape}; expected [N, H, W, "
                       f"{shape[-1]}]")
  if config.superres.low_res:
    low = config.superres.low_res
    if inputs is None:
      raise ValueError(f"{workdir} is a super-resolution model ({low}×{low} → "
                       f"{shape[0]}×{shape[1]}): give its low-resolution input images")
    if inputs.shape[1] < low or inputs.shape[1] != inputs.shape[2]:
      raise ValueError(f"input images of shape {inputs.shape[1:]} cannot condition a "
                       f"{low}×{low} super-resolution model")
    if inputs.shape[1] > low:
      inputs = np.asarray(task.downsample(config, inputs))
    cond["low_res"] = np.resize(inputs, (n, low, low, shape[-1]))
  elif inputs is not None:
    if inputs.shape[1:] != shape:
      raise ValueError(f"input images of shape {inputs.shape[1:]} do not match the "
                       f"model's {shape}")
    cond["image"] = np.resize(inputs, (n,) + shape)
  if (inpaint is not None or strength < 1) and "image" not in cond:
    raise ValueError("inpainting and SDEdit (strength < 1) need input images")
  if inpaint is not None:
    cond["mask"] = samplers.editing.mask(inpaint, n, shape)
  classifier, extra = None, ()
  if classifier_workdir:
    c_config, c_info, c_state, _, _ = load_run(classifier_workdir, mesh=mesh)
    _check_classifier(config, info, c_config, c_info, classifier_workdir)
    classifier = (tasks.get("classifier").log_prob_fn(c_config, c_info), classifier_scale)
    extra = (c_state.ema_params,)
  sample_fn = task.sample(config, info, sampler=sampler, num_steps=num_steps,
                          guidance=guidance, strength=strength, classifier=classifier)
  params = state.ema_params if use_ema else state.params
  images = generate(compile_sampler(sample_fn), params, cond, jax.random.key(seed), mesh,
                    *extra)
  if not np.all(np.isfinite(images)):
    bad = int(np.sum(~np.all(np.isfinite(images.reshape(n, -1)), axis=1)))
    raise FloatingPointError(
        f"{bad} of {n} samples are not finite (sampler "
        f"{sampler or config.sample.sampler!r}, {num_steps or config.sample.num_steps} "
        f"steps, checkpoint step {step}); nothing was written")
  return images, cond["label"], info, step


def _check_classifier(config, info, c_config, c_info, c_workdir):
  """A guiding classifier must be a classifier run on the same path and data shape."""
  problems = []
  if c_config.task != "classifier":
    problems.append(f"it is a {c_config.task!r} run, not a 'classifier' run")
  if paths.from_config(c_config.diffusion) != paths.from_config(config.diffusion):
    problems.append(f"its path (config.diffusion.path={c_config.diffusion.path!r} ...) "
                    f"differs from the model's ({config.diffusion.path!r} ...)")
  if not c_config.classifier.noise_conditional:
    problems.append("it was trained on clean images only "
                    "(config.classifier.noise_conditional=False)")
  if tuple(c_info.image_shape) != tuple(info.image_shape) or c_info.num_classes != info.num_classes:
    problems.append(f"its data ({tuple(c_info.image_shape)}, {c_info.num_classes} classes) "
                    f"differs from the model's ({tuple(info.image_shape)}, "
                    f"{info.num_classes} classes)")
  if problems:
    raise ValueError(f"cannot guide with {c_workdir}: " + "; ".join(problems))
