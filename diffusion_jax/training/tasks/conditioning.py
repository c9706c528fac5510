"""What a diffusion model is conditioned on: classes, text, a low-resolution image
(super-resolution) and editing inputs (SDEdit / inpainting sources and masks).

The conditioning of N samples is a dict of per-example arrays [N, ...]:
    "label"    int [N] (always; ignored by unconditional models);
    "low_res"  [N,l,l,C] in [-1, 1]: required by super-resolution models;
    "image"    [N,H,W,C] in [-1, 1]: the input of SDEdit (strength < 1) and inpainting;
    "mask"     [N,H,W,1|C], 1 = keep that pixel of "image" (inpainting; `editing.py`);
    "tokens"   int [N, L] caption tokens (config.text.encoder='clip');
    "text_embedding" [N, M, D] (config.text.encoder='precomputed').

Classes: label dropout to the null label ∅ (`null_label`) trains classifier-free
guidance. Text (config.text.encoder): the denoiser also gets text features (cross- or
joint attention) and a pooled embedding, from a frozen clip run's text encoder
('clip', loaded as a component of this run by `runs.load`) or from the dataset's
precomputed embeddings ('precomputed'). The ∅ of CFG is then the empty caption: an
example whose label is the null label gets it, so label dropout and the CFG wrapper
drive text exactly as they drive classes. Super-resolution (config.superres.low_res >
0): the low-resolution image, upsampled back to full size, enters as extra input
channels (Saharia et al. 2022; Ho et al. 2022 for the noise augmentation).
"""
from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import data, runs, samplers
from diffusion_jax.data import text as text_lib
from diffusion_jax.training import tasks
from diffusion_jax.training.tasks.base import class_grid_labels

_AUG_SALT = 0x5EED  # fold-in constant for the low-res noise augmentation's key


# --- classes ------------------------------------------------------------------------

def num_classes(config, info) -> int:
  """Classes the network embeds (0: an unconditional model)."""
  return info.num_classes if config.model.class_conditional else 0


def sample_classes(config, info) -> int:
  """Classes samples are conditioned on, by label or by caption (0: unconditional)."""
  return num_classes(config, info) or (info.num_classes if config.text.encoder else 0)


def null_label(config, info) -> int:
  """The label meaning ∅ (classifier-free guidance's unconditional input; dropped to in
  training with p = diffusion.label_dropout). 0: no guidance (unconditional model).
  Class-conditional models: num_classes. Text-only models: labels are just the
  "caption dropped" flag, label ≥ 1 = ∅ (labels themselves are not embedded)."""
  ncls = num_classes(config, info)
  return ncls if ncls or not config.text.encoder else max(info.num_classes, 1)


# --- text ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def text_component(workdir: str):
  """(TextEncoder, numpy params) of a run that encodes text; concrete even when first
  asked for inside a trace (init is compiled), so the cache never holds tracers."""
  with jax.ensure_compile_time_eval():
    comp = runs.load(workdir)
    encoder = tasks.make(comp.config, comp.info).text_encoder
    if encoder is None:
      raise ValueError(f"config.text.clip_workdir={workdir} is a config.task="
                       f"{comp.config.task!r} run, which encodes no text")
    return encoder, jax.tree.map(np.asarray, jax.device_get(comp.params))


def text_conditioner(config):
  """None without config.text.encoder; else fn(cond, null [B] bool, text_params=None)
  -> the denoiser's keyword arguments {text [B,M,D], text_mask [B,M], (text_pooled
  [B,E])}; text_params: the clip run's parameters to use instead of its own (a
  fine-tuned text encoder).

  cond: "tokens" int [B, L] ('clip'; absent = all ∅) or "text_embedding" [B, M, D]
  ('precomputed': tokens whose embedding is all zeros are padding). ∅ is the empty
  caption's encoding ('clip') or a single zero token. The clip encoder's parameters
  are frozen: read once from config.text.clip_workdir and closed over (compile-time
  constants; a large external encoder belongs in 'precomputed')."""
  encoder, L = config.text.encoder, config.text.max_length
  if not encoder:
    return None
  if config.text.templates:  # the training captions' placeholders need embeddings
    check_placeholders(config, text_lib.encode(config.text.templates, 1024),
                       "config.text.templates")
  if encoder == "clip":
    if not config.text.clip_workdir:
      raise ValueError("config.text.encoder='clip' needs config.text.clip_workdir (a "
                       "finished run of configs/digits_clip.py or another clip config)")
    text, params = text_component(config.text.clip_workdir)
    if L > text.max_length:
      raise ValueError(f"config.text.max_length={L} exceeds the clip run's "
                       f"{text.max_length} ({config.text.clip_workdir})")
    empty = jnp.asarray(text_lib.encode([""], L)[0])

    def encode(cond, null, text_params=None):
      tokens = cond.get("tokens")
      tokens = (jnp.broadcast_to(empty, (null.shape[0], L)) if tokens is None
                else jnp.where(null[:, None], empty, tokens.astype(jnp.int32)))
      feats, mask, pooled = text.encode(params if text_params is None else text_params,
                                        tokens)
      # No stop_gradient: a frozen encoder's parameters are constants (nothing flows to
      # them), while a fine-tuning run's trained text parts (LoRA, placeholder rows,
      # `text_params`) get their gradients through here.
      return dict(text=feats, text_mask=mask, text_pooled=pooled)
    return encode

  def precomputed(cond, null, text_params=None):
    del text_params  # no encoder
    if "text_embedding" not in cond:
      raise ValueError("config.text.encoder='precomputed': the conditioning needs "
                       f"'text_embedding' (dataset feature {config.text.embedding_feature!r})")
    emb = cond["text_embedding"].astype(jnp.float32)
    first = jnp.arange(emb.shape[1]) == 0
    mask = jnp.where(null[:, None], first, jnp.any(emb != 0, axis=-1) | first)
    return dict(text=jnp.where(null[:, None, None], 0.0, emb), text_mask=mask)
  return precomputed


def embedding_shape(config) -> tuple:
  """[M, D] of the dataset's precomputed text embedding feature."""
  features = data.features(config.data.name, config.data.data_dir)
  name = config.text.embedding_feature
  if name not in features:
    raise ValueError(f"config.text.embedding_feature={name!r}: dataset "
                     f"{config.data.name!r} has no such feature ({sorted(features.keys())})")
  shape = tuple(features[name].shape)
  if len(shape) != 2:
    raise ValueError(f"config.text.embedding_feature={name!r} has shape {shape}; expected "
                     "[tokens, width]")
  return shape


def text_kwargs(text, cond, labels, null, text_params=None):
  """The denoiser's text keyword arguments for labels [B'] (B' = k·B under CFG, whose
  network call stacks copies of the batch: cond entries are tiled to match)."""
  if text is None:
    return {}
  reps = lambda a: jnp.tile(a, (labels.shape[0] // a.shape[0],) + (1,) * (a.ndim - 1))
  cond = {k: reps(cond[k]) for k in ("tokens", "text_embedding") if k in cond}
  return text(cond, labels == null, text_params)


def _tokens(config, info, labels, prompts):
  """Caption tokens [N, L]: the prompts cycled to N, else each label's caption."""
  if prompts is None:
    if not info.label_captions:
      raise ValueError(f"dataset {config.data.name!r}: give prompts (captions come from "
                       "labels only for datasets captioned by their labels, the embedded "
                       "digits)")
    prompts = [text_lib.digit_caption(int(y) % 10, 0) for y in labels]
  prompts = [prompts[i % len(prompts)] for i in range(len(labels))]
  tokens = text_lib.encode(prompts, config.text.max_length)
  check_placeholders(config, tokens, "the prompts")
  return tokens


def check_placeholders(config, tokens, what: str) -> None:
  """Placeholder tokens <vj> (data/text.py) in `tokens` need a learned embedding: j <
  config.finetune.placeholders (a textual-inversion run, or its file attached)."""
  have = int(config.finetune.placeholders)
  bad = [text_lib.placeholder(j) for j in text_lib.placeholder_ids(tokens) if j >= have]
  if bad:
    raise ValueError(f"{what} use the placeholder token(s) {', '.join(bad)}, but this run "
                     f"has {have} learned placeholder embedding(s) "
                     "(config.finetune.placeholders): sample a textual-inversion run, or "
                     "attach its adapter file (diffusion-jax-sample --adapter=FILE)")


# --- super-resolution ---------------------------------------------------------------

def check_superres(config, info):
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


# --- the conditioning of samples ----------------------------------------------------

def conditioning(config, info, labels, *, prompts=None, images=None, mask=None) -> dict:
  """The conditioning of N = len(labels) samples from what a user gives.

  prompts: captions (cycled to N) of a clip-text model (default: each label's caption).
  images: float [M, h, w, C] in [-1, 1], cycled to N: a super-resolution model's
    low-resolution input (downsampled to config.superres.low_res when larger), else
    the source images of SDEdit and inpainting.
  mask: inpainting's region (a name in `editing.REGIONS`) or a mask [H, W] / [N, H, W]
    (1 = keep the input's pixel); needs images.
  Precomputed-embedding models need their "text_embedding" from the caller.
  """
  labels = np.asarray(labels, np.int32)
  n, shape = len(labels), tuple(info.image_shape)
  cond = {"label": labels}
  if config.text.encoder == "precomputed":
    raise ValueError("config.text.encoder='precomputed': pass 'text_embedding' [N, M, D] "
                     "in the conditioning (labels alone cannot say what to draw)")
  if config.text.encoder == "clip":
    cond["tokens"] = _tokens(config, info, labels, prompts)
  elif prompts is not None:
    raise ValueError("prompts need a text-conditional model (config.text.encoder)")
  if images is not None:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != shape[-1]:
      raise ValueError(f"input images have shape {images.shape}; expected [N, H, W, "
                       f"{shape[-1]}]")
  low = config.superres.low_res
  if low:
    if images is None:
      raise ValueError(f"this is a super-resolution model ({low}×{low} → {shape[0]}×"
                       f"{shape[1]}): give its low-resolution input images")
    if images.shape[1] < low or images.shape[1] != images.shape[2]:
      raise ValueError(f"input images of shape {images.shape[1:]} cannot condition a "
                       f"{low}×{low} super-resolution model")
    if images.shape[1] > low:
      images = np.asarray(downsample(config, images))
    cond["low_res"] = np.resize(images, (n, low, low, shape[-1]))
  elif images is not None:
    if images.shape[1:] != shape:
      raise ValueError(f"input images of shape {images.shape[1:]} do not match the "
                       f"model's {shape}")
    cond["image"] = np.resize(images, (n,) + shape)
  if mask is not None:
    if "image" not in cond:
      raise ValueError("inpainting needs input images")
    cond["mask"] = samplers.editing.mask(mask, n, shape)
  return cond


def grid_conditioning(config, info):
  """(cond, rows) of the training-time sample grid: one row per class (8 rows of 8 for
  unconditional models); super-resolution rows upsample the first training images of
  each class (shown as the conditioning, downsampled); text rows use each class's
  caption (datasets captioned by labels) or the first training examples' captions /
  embeddings."""
  ncls = num_classes(config, info)
  labels = class_grid_labels(ncls, config.sample.per_class)
  from_data = bool(config.superres.low_res or config.text.encoder == "precomputed" or (
      config.text.encoder == "clip" and not info.label_captions))
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
