"""The diffusion task: a denoiser network trained on a Gaussian path, and its samplers.

A task is a plain module with
  init(config, key, info) -> TrainState
  train_step(config, info) -> step(state, batch, key, axis_name=None) -> (state, metrics)
and, where it generates,
  sample(config, info, ...) -> sample_fn(params, cond, keys [N], *extra) -> (images, NFE)
  grid_conditioning(config, info) -> (cond, rows) for the training-time sample grids,
where `info` is the dataset's `DatasetInfo` (image shape, number of classes) and `cond`
a dict of per-example arrays [N, ...] (see `sample`).

Super-resolution (config.superres.low_res > 0) is this task with the low-resolution
image, upsampled back to full size, as extra input channels of the U-Net.
"""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import data, nets, samplers
from diffusion_jax.diffusion import losses, paths, predictions
from diffusion_jax.training import optim, step as step_lib
from diffusion_jax.training.state import TrainState

_AUG_SALT = 0x5EED  # fold-in constant for the low-res noise augmentation's key


def num_classes(config, info) -> int:
  """Classes the denoiser is conditioned on (0: an unconditional model)."""
  return info.num_classes if config.model.class_conditional else 0


def model(config, info):
  return nets.build_denoiser(config.model, out_channels=info.image_shape[-1],
                             num_classes=num_classes(config, info))


def _scaled(path, config, x, t):
  """Network input: x_t times the prediction's input preconditioning (EDM's c_in)."""
  scale = predictions.input_scale(path, config.diffusion.prediction, t)
  return x * scale.reshape(scale.shape + (1,) * (x.ndim - 1))


def _check_superres(config, info):
  low, size = config.superres.low_res, info.image_shape[0]
  if low and not low < size:
    raise ValueError(f"config.superres.low_res={low} must be smaller than the image size "
                     f"{size}")


def downsample(config, images):
  """Full-resolution images [B,H,W,C] → the low-res stage's [B,l,l,C] (antialiased)."""
  low = config.superres.low_res
  return jax.image.resize(images, (images.shape[0], low, low, images.shape[-1]), "linear",
                          antialias=True)


def low_res_condition(config, info, low_res, keys):
  """The super-resolution conditioning: low_res [B,l,l,C] + noise_aug·z (Ho et al.
  2022's Gaussian conditioning augmentation, at a fixed level), upsampled bilinearly to
  [B,H,W,C]. keys: one per example."""
  if config.superres.noise_aug:
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _AUG_SALT),
                                             low_res.shape[1:]))(keys)
    low_res = low_res + config.superres.noise_aug * z
  shape = (low_res.shape[0],) + tuple(info.image_shape)
  return jax.image.resize(low_res, shape, "linear")


def init(config, key, info) -> TrainState:
  _check_superres(config, info)
  x = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  cond = x if config.superres.low_res else None
  params = model(config, info).init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32),
                                    cond=cond)["params"]
  tx, _ = optim.make(config.optim, config.train.num_steps)
  return TrainState.create(params, tx)


def train_step(config, info):
  net = model(config, info)
  path = paths.from_config(config.diffusion)
  tx, sched = optim.make(config.optim, config.train.num_steps)

  def loss_fn(params, batch, keys, dropout_key):
    x0 = batch["image"]
    cond = None
    if config.superres.low_res:
      cond = low_res_condition(config, info, downsample(config, x0), keys)
    model_fn = lambda x, t, y: net.apply({"params": params}, _scaled(path, config, x, t), t, y,
                                         cond=cond, train=True, rngs={"dropout": dropout_key})
    loss, _ = losses.loss(config.diffusion, path, model_fn, x0, batch["label"], keys,
                          num_classes(config, info))
    return loss, {}

  return step_lib.make_train_step(loss_fn, tx, sched, ema_decay=config.train.ema_decay)


def network_fn(config, info):
  """fn(params, x_t [B,H,W,C], t [B], labels [B]) -> the network's prediction (no
  guidance; for likelihoods). Not for super-resolution models (they need their
  conditioning image)."""
  if config.superres.low_res:
    raise ValueError("likelihoods of super-resolution models are not supported")
  net, path = model(config, info), paths.from_config(config.diffusion)
  return lambda params, x, t, y: net.apply({"params": params}, _scaled(path, config, x, t), t, y)


def sample(config, info, *, sampler: str | None = None, num_steps: int | None = None,
           guidance: float | None = None, strength: float = 1.0, classifier=None):
  """sample_fn(params, cond, keys [N], classifier_params=None) -> (images [N,H,W,C] in
  [-1, 1], NFE).

  cond holds per-example arrays [N, ...]:
    "label"    int [N] (always; ignored by unconditional models);
    "low_res"  [N,l,l,C] in [-1, 1]: required by super-resolution models;
    "image"    [N,H,W,C] in [-1, 1]: the input of SDEdit (strength < 1) and inpainting;
    "mask"     [N,H,W,1|C], 1 = keep that pixel of "image" (inpainting; `editing.py`).
  strength: SDEdit's t₀ — the input is noised to t₀ and solved back from there.
  classifier: (log_prob(params, x_t, t, labels) -> [N], scale) for classifier guidance;
    its parameters are the last argument of sample_fn.
  Defaults come from config.sample. CFG applies only to class-conditional models.
  Sample i depends only on keys[i] and the i-th entries of cond.
  """
  s = config.sample
  sampler = s.sampler if sampler is None else sampler
  num_steps = s.num_steps if num_steps is None else num_steps
  guidance = s.guidance if guidance is None else guidance
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength}: SDEdit's t₀ must be in (0, 1]")
  solve = samplers.get(sampler)
  options = {"ddim": {"eta": s.ddim_eta}, "ddpm": {"variance": s.ddpm_variance},
             "pc": {"snr": s.pc_snr, "corrector_steps": s.pc_corrector_steps},
             "edm": {"s_churn": s.edm_churn}}.get(sampler, {})
  if s.spacing is not None:  # else each sampler's own default (uniform; karras for edm)
    options["spacing"] = s.spacing
  _check_superres(config, info)
  net, ncls = model(config, info), num_classes(config, info)
  path = paths.from_config(config.diffusion)
  shape = tuple(info.image_shape)

  def sample_fn(params, cond, keys, classifier_params=None):
    labels = cond["label"]
    if strength < 1 and "image" not in cond:
      raise ValueError("SDEdit (strength < 1) needs an input image")
    sr = None
    if config.superres.low_res:
      if "low_res" not in cond:
        raise ValueError("this super-resolution model needs low-resolution inputs")
      sr = low_res_condition(config, info, cond["low_res"], keys)

    def model_fn(x, t, y):
      # CFG stacks [x, x]: repeat the image conditioning to match.
      c = None if sr is None else jnp.tile(sr, (x.shape[0] // sr.shape[0], 1, 1, 1))
      return net.apply({"params": params}, _scaled(path, config, x, t), t, y, cond=c)

    cfg_on = bool(ncls and guidance)
    if cfg_on:
      model_fn = samplers.guidance.classifier_free(model_fn, guidance, ncls)
    denoiser = samplers.make_denoiser(model_fn, path, config.diffusion.prediction, labels,
                                      clip_x0=s.clip_x0)
    if classifier is not None:
      log_prob, scale = classifier
      denoiser = samplers.guidance.classifier(
          denoiser, path, lambda x, t: log_prob(classifier_params, x, t, labels), scale)
    x_init = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
    if strength < 1:
      x_init = samplers.editing.noise_to(path, cond["image"], strength,
                                         jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys))
    if "mask" in cond:
      denoiser = samplers.editing.inpaint(denoiser, path, cond["image"], cond["mask"])
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    x0, nfe = solve(denoiser, path, x_init, step_keys, num_steps, t_start=strength, **options)
    if "mask" in cond:
      x0 = samplers.editing.paste(x0, cond["image"], cond["mask"])
    return jnp.clip(x0, -1.0, 1.0), nfe * (2 if cfg_on else 1)  # CFG: two passes per call

  return sample_fn


def class_grid_labels(num_classes: int, per_class: int) -> np.ndarray:
  """One row per class: [0]*per_class + [1]*per_class + ... (unconditional: 8×8 zeros)."""
  if not num_classes:
    return np.zeros(64, np.int32)
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def grid_conditioning(config, info):
  """(cond, rows) of the training-time sample grid: one row per class (8 rows of 8 for
  unconditional models); super-resolution rows upsample the first training images of
  each class (shown as the conditioning, downsampled)."""
  ncls = num_classes(config, info)
  labels = class_grid_labels(ncls, config.sample.per_class)
  cond = {"label": labels}
  if config.superres.low_res:
    source, _ = data.get_source(config.data.name, config.data.split, config.data.data_dir,
                                image_size=config.data.image_size or None)
    size = config.data.image_size or None
    need = collections.Counter(labels.tolist())
    found = {y: [] for y in need}
    for i in range(len(source)):
      if all(len(found[y]) == need[y] for y in need):
        break
      element = source[i]
      y = int(element["label"]) if ncls else 0
      if y in found and len(found[y]) < need[y]:
        found[y].append(data.to_model_image(element["image"], size))
    if not all(len(found[y]) == need[y] for y in need):
      raise ValueError(f"split {config.data.split!r} lacks {config.sample.per_class} "
                       "examples of every class for the sample grid")
    images = np.stack([im for y in sorted(need) for im in found[y]])
    cond["low_res"] = np.asarray(downsample(config, jnp.asarray(np.stack(images))))
  return cond, (ncls or 8)
