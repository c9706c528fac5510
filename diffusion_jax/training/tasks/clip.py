"""The CLIP task: a text transformer and a ViT trained end to end on (image, caption)
pairs with the CLIP softmax or the SigLIP sigmoid loss (config.clip.loss; see
`losses/contrastive.py`, `nets/clip.py`).

Batches carry "tokens" [B, max_length] (data/pipeline.py: captions from the labels for
the embedded digit datasets). The loss is over the global batch: under `jit` the batch
arrays are global (XLA gathers the sharded embeddings); under `pmap` (axis_name set) the
embeddings are all-gathered first, and since every device then computes the same loss,
the gradients, averaged over devices by the generic step, are the global-batch ones.

It has no sampler (no sample grids). Held-out evaluation: `retrieval_accuracy`,
`zero_shot_accuracy`; another run uses the trained encoders through `load_encoder` and
`nets.clip.encode_text` / `encode_image`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.data import text as text_lib
from diffusion_jax.losses import contrastive
from diffusion_jax.nets import clip as clip_net
from diffusion_jax.training import optim, step as step_lib
from diffusion_jax.training.state import TrainState


def model(config):
  return clip_net.from_config(config)


def _check(config, info):
  p, (h, w, _) = config.clip.patch_size, info.image_shape
  if p <= 0 or h % p or w % p:
    raise ValueError(f"config.clip.patch_size={p} must divide the image size {h}×{w} "
                     f"(config.data.name={config.data.name!r})")


def init(config, key, info) -> TrainState:
  _check(config, info)
  images = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  tokens = jnp.zeros((1, config.text.max_length), jnp.int32)
  params = model(config).init(key, images, tokens)["params"]
  tx, _ = optim.make(config.optim, config.train.num_steps)
  return TrainState.create(params, tx)


def _gather(x, axis_name):
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def train_step(config, info):
  """step(state, batch, key, axis_name=None) -> (state, metrics). batch: "image"
  [B,H,W,C], "tokens" [B,L], "label" [B]. Metrics: loss, the in-batch top-1 retrieval
  accuracies i2t, t2i (own caption/image; ties between identical captions go to the
  lowest index, so these understate) and i2t_class, t2i_class (same label), and the
  temperature logit_scale (and logit_bias)."""
  _check(config, info)
  net = model(config)
  tx, sched = optim.make(config.optim, config.train.num_steps)

  def loss_fn(params, batch, keys, dropout_key, axis_name=None):
    del keys, dropout_key  # deterministic: no noise, no dropout
    if "tokens" not in batch:
      raise ValueError("config.task='clip' needs batches with 'tokens'; build the "
                       "iterator with text=data.text_options(config)")
    img, txt, scale, bias = net.apply({"params": params}, batch["image"], batch["tokens"])
    img, txt, labels = (_gather(x, axis_name) for x in (img, txt, batch["label"]))
    loss = contrastive.loss(config.clip.loss, img, txt, scale, bias)
    sim = contrastive.similarity_logits(img, txt, 1.0)
    metrics = dict(contrastive.retrieval_accuracy(sim, labels), logit_scale=scale)
    if config.clip.loss == "siglip":
      metrics["logit_bias"] = bias
    return loss, metrics

  def step(state, batch, key, axis_name=None):
    body = step_lib.make_train_step(functools.partial(loss_fn, axis_name=axis_name), tx,
                                    sched, ema_decay=config.train.ema_decay)
    return body(state, batch, key, axis_name)
  return step


def embed_fns(config):
  """Jitted (encode_image(params, images) -> [N, E], encode_text(params, tokens) -> [N, E])."""
  net = model(config)
  image = jax.jit(lambda p, x: net.apply({"params": p}, x, method=clip_net.CLIP.encode_image))
  text = jax.jit(lambda p, t: net.apply({"params": p}, t, method=clip_net.CLIP.encode_text)[2])
  return image, text


def _embed(fn, params, x, batch_size):
  """fn over x [N, ...] in fixed-size chunks (the last one padded: one compile)."""
  out = []
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(params, chunk))[:batch_size - pad])
  return np.concatenate(out)


def retrieval_accuracy(config, info, params, images, tokens, labels=None, *,
                       batch_size: int = 256) -> dict[str, float]:
  """Top-1 retrieval over a held-out set: image i's caption is tokens[i].

  images [N,H,W,C] in [−1, 1], tokens [N, L], labels [N] (optional). Returns
  {"i2t", "t2i"} (the retrieved caption / image is the example's own) and, with labels,
  {"i2t_class", "t2i_class"} (the retrieved one has the same label), floats in [0, 1].

  With captions made from labels, a caption tells only the class: the instance-level
  numbers are capped near 1 / (examples per class), and class-level retrieval is the
  meaningful (headline) number there (docs/clip.md).
  """
  _check(config, info)
  encode_image, encode_text = embed_fns(config)
  img = _embed(encode_image, params, np.asarray(images, np.float32), batch_size)
  txt = _embed(encode_text, params, np.asarray(tokens, np.int32), batch_size)
  sim = img.astype(np.float64) @ txt.T.astype(np.float64)
  labels = None if labels is None else np.asarray(labels)
  return {k: float(v) for k, v in contrastive.retrieval_accuracy(sim, labels).items()}


def zero_shot_accuracy(config, info, params, images, labels, *, num_classes: int = 10,
                       batch_size: int = 256) -> float:
  """Zero-shot classification of the digits (CLIP's prompt ensembling): class c's
  embedding is the normalised mean over `data.text.TEMPLATES` of its captions' text
  embeddings; an image gets the class of highest cosine similarity. Returns top-1."""
  _check(config, info)
  encode_image, encode_text = embed_fns(config)
  prompts = text_lib.class_captions(num_classes)
  tokens = text_lib.encode([p for row in prompts for p in row], config.text.max_length)
  txt = _embed(encode_text, params, tokens, batch_size)
  txt = txt.reshape(num_classes, len(text_lib.TEMPLATES), -1).mean(axis=1)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  img = _embed(encode_image, params, np.asarray(images, np.float32), batch_size)
  return float(np.mean(np.argmax(img @ txt.T, axis=1) == np.asarray(labels)))


def load_encoder(workdir: str, step: int | None = None, use_ema: bool = True):
  """A finished clip run → (its config, its parameters), for
  `nets.clip.encode_text(config, params, tokens)` (e.g. config.text.clip_workdir)."""
  from diffusion_jax.training import generate  # generate imports the task registry
  config, _, state, _, _ = generate.load_run(workdir, step)
  if config.task != "clip":
    raise ValueError(f"{workdir} is a config.task={config.task!r} run, not a clip run")
  return config, jax.device_get(state.ema_params if use_ema else state.params)


def evaluate_run(workdir: str, *, split: str = "test", data_dir: str | None = None,
                 step: int | None = None, use_ema: bool = True, seed: int = 0) -> dict:
  """Held-out retrieval of a clip run's checkpoint on `split` of its dataset: the
  `retrieval_accuracy` numbers, `zero_shot` (digit datasets: captions from labels) and
  `chance` (1 / classes for the class-level numbers), with `step` and `num_examples`.
  Captions of the embedded digits use templates drawn from `seed`."""
  from diffusion_jax import data
  from diffusion_jax.training import generate
  config, info, state, _, step = generate.load_run(workdir, step)
  if config.task != "clip":
    raise ValueError(f"{workdir} is a config.task={config.task!r} run, not a clip run")
  params = jax.device_get(state.ema_params if use_ema else state.params)
  images, labels, tokens = data.load_text_arrays(
      config.data.name, split, data_dir or config.data.data_dir,
      text=data.text_options(config, force=True), image_size=config.data.image_size or None,
      seed=seed)
  results = retrieval_accuracy(config, info, params, images, tokens,
                               labels if info.num_classes else None)
  if config.data.name in data.EMBEDDED:
    results["zero_shot"] = zero_shot_accuracy(config, info, params, images, labels,
                                              num_classes=info.num_classes)
  if info.num_classes:
    results["chance"] = 1.0 / info.num_classes
  return dict(results, step=int(step), split=split, num_examples=int(len(images)),
              ema=use_ema)
