"""The CLIP task: a text transformer and a ViT trained end to end on (image, caption)
pairs with the CLIP softmax or the SigLIP sigmoid loss (config.clip.loss; see
`losses/contrastive.py`, `nets/clip.py`).

Batches carry "tokens" [B, max_length] (data/pipeline.py: captions from the labels for
the embedded digit datasets). The loss is over the global batch: under `jit` the batch
arrays are global (XLA gathers the sharded embeddings); under `pmap` (axis_name set) the
embeddings are all-gathered first, and since every device then computes the same loss,
the gradients, averaged over devices by the generic step, are the global-batch ones.

It generates nothing (no `generator`: no sample grids). Held-out evaluation:
`retrieval_accuracy`, `zero_shot_accuracy`, `evaluate_run`; another run uses the
trained encoders as a component (`runs.load`) through this task's `text_encoder` and
`features` capabilities.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import data, runs
from diffusion_jax.data import text as text_lib
from diffusion_jax.losses import contrastive
from diffusion_jax.nets import clip as clip_net
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks.base import Features, Player, Task, TextEncoder


def model(config):
  return clip_net.from_config(config)


def _check(config, info):
  p, (h, w, _) = config.clip.patch_size, info.image_shape
  if p <= 0 or h % p or w % p:
    raise ValueError(f"config.clip.patch_size={p} must divide the image size {h}×{w} "
                     f"(config.data.name={config.data.name!r})")


def _gather(x, axis_name):
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def make(config, info) -> Task:
  """Batches carry "tokens" (`Task.text`). Metrics: loss, the in-batch top-1 retrieval
  accuracies i2t, t2i (own caption/image; ties between identical captions go to the
  lowest index, so these understate) and i2t_class, t2i_class (same label), and the
  temperature logit_scale (and logit_bias). Capabilities: `text_encoder` (the text
  transformer, for text-to-image) and `features` (L2-normalised image embeddings and
  the caption embeddings in the same space, for CLIP score)."""
  _check(config, info)
  net = model(config)
  tx, sched = optim.make(config.optim, config.train.num_steps)

  def init(key):
    images = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
    tokens = jnp.zeros((1, config.text.max_length), jnp.int32)
    return state_lib.init_state(players, net.init(key, images, tokens)["params"])

  def loss(params, batch, keys, ctx):
    del keys  # deterministic: no noise, no dropout
    if "tokens" not in batch:
      raise ValueError("config.task='clip' needs batches with 'tokens'; build the "
                       "iterator with text=task.text")
    img, txt, scale, bias = net.apply({"params": params}, batch["image"], batch["tokens"])
    img, txt, labels = (_gather(x, ctx.axis_name) for x in (img, txt, batch["label"]))
    value = contrastive.loss(config.clip.loss, img, txt, scale, bias)
    sim = contrastive.similarity_logits(img, txt, 1.0)
    metrics = dict(contrastive.retrieval_accuracy(sim, labels), logit_scale=scale)
    if config.clip.loss == "siglip":
      metrics["logit_bias"] = bias
    return value, (metrics, params)

  def image_features(params, images):
    emb = clip_net.encode_image(config, params, images)
    return jnp.zeros((images.shape[0], 1), jnp.float32), emb

  players = (Player(loss=loss, tx=tx, schedule=sched, ema_decay=config.train.ema_decay,
                    mask=optim.trainable(config.optim.trainable)),)
  return Task(
      init=init, players=players, text=data.text_options(config),
      features=Features(image=image_features,
                        text=lambda p, t: clip_net.encode_text(config, p, t)[2],
                        max_length=config.text.max_length),
      text_encoder=TextEncoder(encode=lambda p, t: clip_net.encode_text(config, p, t),
                               max_length=config.text.max_length))


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


def evaluate_run(workdir: str, *, split: str = "test", data_dir: str | None = None,
                 step: int | None = None, use_ema: bool = True, seed: int = 0) -> dict:
  """Held-out retrieval of a clip run's checkpoint on `split` of its dataset: the
  `retrieval_accuracy` numbers, `zero_shot` (datasets captioned by labels) and
  `chance` (1 / classes for the class-level numbers), with `step` and `num_examples`.
  Captions of the embedded digits use templates drawn from `seed`."""
  comp = runs.load(workdir, step=step, params="ema" if use_ema else "raw")
  config, info = comp.config, comp.info
  if config.task != "clip":
    raise ValueError(f"{workdir} is a config.task={config.task!r} run, not a clip run")
  params = jax.device_get(comp.params)
  images, labels, tokens = data.load_text_arrays(
      config.data.name, split, data_dir or config.data.data_dir,
      text=data.text_options(config), image_size=config.data.image_size or None,
      seed=seed)
  results = retrieval_accuracy(config, info, params, images, tokens,
                               labels if info.num_classes else None)
  if info.label_captions:
    results["zero_shot"] = zero_shot_accuracy(config, info, params, images, labels,
                                              num_classes=info.num_classes)
  if info.num_classes:
    results["chance"] = 1.0 / info.num_classes
  return dict(results, step=comp.step, split=split, num_examples=int(len(images)),
              ema=use_ema)
