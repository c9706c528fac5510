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

Text-to-image (config.text.encoder): the denoiser also gets text features (cross- or
joint attention) and a pooled text embedding, from a frozen clip run's text encoder
over the batch's caption tokens ('clip'), or from the dataset's precomputed embeddings
('precomputed'). The null condition of classifier-free guidance is the empty caption
(zero embeddings): an example whose label is the null label `null_label(config, info)`
gets it, so label dropout in the loss and the CFG wrapper of the samplers drive text
exactly as they drive classes.
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import data, nets, samplers
from diffusion_jax.data import text as text_lib
from diffusion_jax.diffusion import losses, paths, predictions
from diffusion_jax.nets import clip as clip_net
from diffusion_jax.training import optim, step as step_lib
from diffusion_jax.training.state import TrainState

_AUG_SALT = 0x5EED  # fold-in constant for the low-res noise augmentation's key


def num_classes(config, info) -> int:
  """Classes the denoiser is conditioned on (0: an unconditional model)."""
  return info.num_classes if config.model.class_conditional else 0


def null_label(config, info) -> int:
  """The label meaning ∅ (classifier-free guidance's unconditional input; dropped to in
  training with p = diffusion.label_dropout). 0: no guidance (unconditional model).
  Class-conditional models: num_classes. Text-only models: labels are just the
  "caption dropped" flag, label ≥ 1 = ∅ (labels themselves are not embedded)."""
  ncls = num_classes(config, info)
  return ncls if ncls or not config.text.encoder else max(info.num_classes, 1)


@functools.lru_cache(maxsize=4)
def _clip_encoder(workdir: str):
  """(clip config, numpy params) of a clip run; concrete even when first asked for
  inside a trace (init is compiled), so the cache never holds tracers."""
  from diffusion_jax.training.tasks import clip as clip_task  # same layer, loaded lazily
  with jax.ensure_compile_time_eval():
    clip_config, params = clip_task.load_encoder(workdir)
  return clip_config, jax.tree.map(np.asarray, params)


def text_conditioner(config):
  """None without config.text.encoder; else fn(cond, null [B] bool) -> the denoiser's
  keyword arguments {text [B,M,D], text_mask [B,M], (text_pooled [B,E])}.

  cond: the batch / sampling conditioning: "tokens" int [B, L] ('clip'; absent = all ∅)
  or "text_embedding" [B, M, D] ('precomputed': tokens whose embedding is all zeros are
  padding). ∅ is the empty caption's encoding ('clip') or a single zero token. The clip
  encoder's parameters are frozen: read once from config.text.clip_workdir and closed
  over (compile-time constants; a large external encoder belongs in 'precomputed')."""
  encoder, L = config.text.encoder, config.text.max_length
  if not encoder:
    return None
  if encoder == "clip":
    if not config.text.clip_workdir:
      raise ValueError("config.text.encoder='clip' needs config.text.clip_workdir (a "
                       "finished run of configs/digits_clip.py or another clip config)")
    clip_config, clip_params = _clip_encoder(config.text.clip_workdir)
    if L > clip_config.text.max_length:
      raise ValueError(f"config.text.max_length={L} exceeds the clip run's "
                       f"{clip_config.text.max_length} ({config.text.clip_workdir})")
    empty = jnp.asarray(text_lib.encode([""], L)[0])

    def encode(cond, null):
      tokens = cond.get("tokens")
      tokens = (jnp.broadcast_to(empty, (null.shape[0], L)) if tokens is None
                else jnp.where(null[:, None], empty, tokens.astype(jnp.int32)))
      feats, mask, pooled = clip_net.encode_text(clip_config, clip_params, tokens)
      return dict(text=jax.lax.stop_gradient(feats), text_mask=mask,
                  text_pooled=jax.lax.stop_gradient(pooled))
    return encode

  def precomputed(cond, null):
    if "text_embedding" not in cond:
      raise ValueError("config.text.encoder='precomputed': the conditioning needs "
                       f"'text_embedding' (dataset feature {config.text.embedding_feature!r})")
    emb = cond["text_embedding"].astype(jnp.float32)
    first = jnp.arange(emb.shape[1]) == 0
    mask = jnp.where(null[:, None], first, jnp.any(emb != 0, axis=-1) | first)
    return dict(text=jnp.where(null[:, None, None], 0.0, emb), text_mask=mask)
  return precomputed


def _embedding_shape(config) -> tuple:
  """[M, D] of the dataset's precomputed text embedding feature."""
  from diffusion_jax.data import pipeline
  features = pipeline._open_builder(config.data.name, config.data.data_dir).info.features
  name = config.text.embedding_feature
  if name not in features:
    raise ValueError(f"config.text.embedding_feature={name!r}: dataset "
                     f"{config.data.name!r} has no such feature ({sorted(features.keys())})")
  shape = tuple(features[name].shape)
  if len(shape) != 2:
    raise ValueError(f"config.text.embedding_feature={name!r} has shape {shape}; expected "
                     "[tokens, width]")
  return shape


def _text_kwargs(text, cond, labels, null):
  """The denoiser's text keyword arguments for labels [B'] (B' = k·B under CFG, whose
  network call stacks copies of the batch: cond entries are tiled to match)."""
  if text is None:
    return {}
  reps = lambda a: jnp.tile(a, (labels.shape[0] // a.shape[0],) + (1,) * (a.ndim - 1))
  cond = {k: reps(cond[k]) for k in ("tokens", "text_embedding") if k in cond}
  return text(cond, labels == null)


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
  labels = jnp.zeros((1,), jnp.int32)
  text = text_conditioner(config)
  example = {}
  if config.text.encoder == "precomputed":  # shape from the dataset's feature
    example["text_embedding"] = jnp.zeros((1,) + _embedding_shape(config), jnp.float32)
  kw = _text_kwargs(text, example, labels, -1) if text else {}
  params = model(config, info).init(key, x, jnp.zeros((1,)), labels, cond=cond,
                                    **kw)["params"]
  tx, _ = optim.make(config.optim, config.train.num_steps)
  return TrainState.create(params, tx)


def train_step(config, info):
  net = model(config, info)
  path = paths.from_config(config.diffusion)
  tx, sched = optim.make(config.optim, config.train.num_steps)
  text, null = text_conditioner(config), null_label(config, info)

  def loss_fn(params, batch, keys, dropout_key):
    x0 = batch["image"]
    cond = None
    if config.superres.low_res:
      cond = low_res_condition(config, info, downsample(config, x0), keys)
    model_fn = lambda x, t, y: net.apply(
        {"params": params}, _scaled(path, config, x, t), t, y, cond=cond, train=True,
        rngs={"dropout": dropout_key}, **_text_kwargs(text, batch, y, null))
    loss, _ = losses.loss(config.diffusion, path, model_fn, x0, batch["label"], keys, null)
    return loss, {}

  return step_lib.make_train_step(loss_fn, tx, sched, ema_decay=config.train.ema_decay)


def network_fn(config, info):
  """fn(params, x_t [B,H,W,C], t [B], labels [B]) -> the network's prediction (no
  guidance; for likelihoods). Not for super-resolution models (they need their
  conditioning image)."""
  if config.superres.low_res:
    raise ValueError("likelihoods of super-resolution models are not supported")
  net, path = model(config, info), paths.from_config(config.diffusion)
  text, null = text_conditioner(config), null_label(config, info)
  if config.text.encoder == "precomputed":
    raise ValueError("likelihoods of models on precomputed text embeddings are not supported")
  return lambda params, x, t, y: net.apply({"params": params}, _scaled(path, config, x, t), t, y,
                                           **_text_kwargs(text, {}, y, null))


def sample(config, info, *, sampler: str | None = None, num_steps: int | None = None,
           guidance: float | None = None, strength: float = 1.0, classifier=None):
  """sample_fn(params, cond, keys [N], classifier_params=None) -> (images [N,H,W,C] in
  [-1, 1], NFE).

  cond holds per-example arrays [N, ...]:
    "label"    int [N] (always; ignored by unconditional models);
    "low_res"  [N,l,l,C] in [-1, 1]: required by super-resolution models;
    "image"    [N,H,W,C] in [-1, 1]: the input of SDEdit (strength < 1) and inpainting;
    "mask"     [N,H,W,1|C], 1 = keep that pixel of "image" (inpainting; `editing.py`);
    "tokens"   int [N, L] caption tokens (config.text.encoder='clip'; `conditioning`);
    "text_embedding" [N, M, D] (config.text.encoder='precomputed').
  strength: SDEdit's t₀ — the input is noised to t₀ and solved back from there.
  classifier: (log_prob(params, x_t, t, labels) -> [N], scale) for classifier guidance;
    its parameters are the last argument of sample_fn.
  Defaults come from config.sample. CFG applies to class- and text-conditional models.
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
  net, null = model(config, info), null_label(config, info)
  text = text_conditioner(config)
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

    if text is not None and config.text.encoder == "clip" and "tokens" not in cond:
      raise ValueError("this text-conditional model needs 'tokens' in the conditioning "
                       "(see `conditioning`)")

    def model_fn(x, t, y):
      # CFG stacks [x, x]: repeat the image conditioning to match.
      c = None if sr is None else jnp.tile(sr, (x.shape[0] // sr.shape[0], 1, 1, 1))
      return net.apply({"params": params}, _scaled(path, config, x, t), t, y, cond=c,
                       **_text_kwargs(text, cond, y, null))

    cfg_on = bool(null and guidance)
    if cfg_on:
      model_fn = samplers.guidance.classifier_free(model_fn, guidance, null)
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


def conditioning(config, info, labels, prompts=None) -> dict:
  """Sampling conditioning of N samples from labels [N] (and captions): {"label"} and,
  for a clip-text model, "tokens" — the prompts (strings, cycled to N) or, without
  prompts, the digit caption of each label (template 0; the embedded datasets).
  Precomputed-embedding models need their "text_embedding" from the caller."""
  labels = np.asarray(labels, np.int32)
  cond = {"label": labels}
  if config.text.encoder == "precomputed":
    raise ValueError("config.text.encoder='precomputed': pass 'text_embedding' [N, M, D] "
                     "in the conditioning (labels alone cannot say what to draw)")
  if config.text.encoder == "clip":
    if prompts is None:
      if config.data.name not in data.builders.EMBEDDED:
        raise ValueError(f"dataset {config.data.name!r}: give prompts (captions come from "
                         "labels only for the embedded digit datasets)")
      prompts = [text_lib.digit_caption(int(y) % 10, 0) for y in labels]
    prompts = [prompts[i % len(prompts)] for i in range(len(labels))]
    cond["tokens"] = text_lib.encode(prompts, config.text.max_length)
  elif prompts is not None:
    raise ValueError("prompts need a text-conditional model (config.text.encoder)")
  return cond


def grid_conditioning(config, info):
  """(cond, rows) of the training-time sample grid: one row per class (8 rows of 8 for
  unconditional models); super-resolution rows upsample the first training images of
  each class (shown as the conditioning, downsampled); text rows use each class's
  caption (embedded digits) or the first training examples' captions / embeddings."""
  ncls = num_classes(config, info)
  labels = class_grid_labels(ncls, config.sample.per_class)
  from_data = bool(config.superres.low_res or config.text.encoder == "precomputed" or (
      config.text.encoder == "clip" and config.data.name not in data.builders.EMBEDDED))
  if not from_data:
    grid_labels = labels if ncls or not config.text.encoder else np.repeat(
        np.arange(8, dtype=np.int32), 8)  # text-only digits: a row per digit 0..7
    cond = conditioning(config, info, grid_labels)
    cond["label"] = labels
    return cond, (ncls or 8)
  elements = _first_of_each_class(config, labels, ncls)
  cond = {"label": labels}
  if config.superres.low_res:
    size = config.data.image_size or None
    images = np.stack([data.to_model_image(e["image"], size) for e in elements])
    cond["low_res"] = np.asarray(downsample(config, jnp.asarray(images)))
  if config.text.encoder == "precomputed":
    cond["text_embedding"] = np.stack([np.asarray(e[config.text.embedding_feature], np.float32)
                                       for e in elements])
  elif config.text.encoder == "clip":
    captions = [e[config.text.feature] for e in elements]
    captions = [c.item() if isinstance(c, np.ndarray) else c for c in captions]
    cond["tokens"] = text_lib.encode(captions, config.text.max_length)
  return cond, (ncls or 8)


def _first_of_each_class(config, labels, ncls):
  """The first training elements of each class in `labels` (in labels' order)."""
  source, _ = data.get_source(config.data.name, config.data.split, config.data.data_dir,
                              image_size=config.data.image_size or None)
  need = collections.Counter(labels.tolist())
  found = {y: [] for y in need}
  for i in range(len(source)):
    if all(len(found[y]) == need[y] for y in need):
      break
    element = source[i]
    y = int(element["label"]) if ncls else 0
    if y in found and len(found[y]) < need[y]:
      found[y].append(element)
  if not all(len(found[y]) == need[y] for y in need):
    raise ValueError(f"split {config.data.split!r} lacks {config.sample.per_class} "
                     "examples of every class for the sample grid")
  return [e for y in sorted(need) for e in found[y]]
