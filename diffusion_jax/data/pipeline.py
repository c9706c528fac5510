"""Deterministic, resumable, multi-host image input pipeline (TFDS + grain).

Invariant: the global batch at step s depends only on (data config, text options,
seed), not on how many processes read it. All processes build the same infinite element
stream (shuffle -> repeat -> per-element preprocessing keyed by global stream
position), cut it into chunks of b_local = batch_size // process_count, and
process p takes chunks p, p + P, p + 2P, ... So concatenating hosts 0..P-1's
step-s batches in order gives the single-process step-s batch.

Runs whose task needs text (`Task.text`, built by `text_options(config)`) also get
"tokens" (data/text.py): captions made from the
labels for the embedded digit datasets (template drawn from the element's generator),
else the dataset's string feature config.text.feature; with config.text.encoder ==
'precomputed' also "text_embedding", the dataset feature config.text.embedding_feature.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from diffusion_jax.data import builders, text as text_lib


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about one split, as the pipeline yields it.

  Attributes:
    image_shape: (H, W, C) after any resize.
    num_classes: number of label classes; 0 for unconditional datasets.
    num_examples: number of examples in the split.
    kind: "image" (uint8 pixels, 1 or 3 channels make pictures) or "values" (float32
      arrays used as they are, e.g. ring8's 2-D points).
    label_captions: captions come from the labels (the embedded digit datasets:
      `text.digit_caption`), so a label alone can be captioned.
  """

  image_shape: tuple[int, int, int]
  num_classes: int
  num_examples: int
  kind: str = "image"
  label_captions: bool = False

  @property
  def is_image(self) -> bool:
    """Pictures: uint8 pixels with 1 or 3 channels (grids, PNGs, Inception apply)."""
    return self.kind == "image" and self.image_shape[-1] in (1, 3)


@dataclasses.dataclass(frozen=True)
class TextOptions:
  """What text a run's batches carry (from `text_options(config)`).

  Attributes:
    max_length: tokens per caption, incl. BOS/EOS (config.text.max_length).
    feature: the dataset's string feature (config.text.feature); unused for the
      embedded digit datasets, whose captions come from their labels.
    embedding_feature: config.text.embedding_feature when config.text.encoder ==
      'precomputed' (passed through as "text_embedding" float32), else None.
  """

  max_length: int
  feature: str = "caption"
  embedding_feature: str | None = None


def text_options(config: Any) -> TextOptions:
  """The TextOptions of a full config's `text` section (a task whose batches carry
  text asks for them: `Task.text`)."""
  return TextOptions(
      max_length=int(config.text.max_length),
      feature=config.text.feature,
      embedding_feature=(config.text.embedding_feature
                         if config.text.encoder == "precomputed" else None),
  )


def _check_text_features(name: str, data_dir: str | None, text: TextOptions) -> bool:
  """Raises unless dataset `name` has the features `text` needs. Returns True when
  captions come from labels (the embedded digit datasets)."""
  text_lib.encode([""], text.max_length)  # validates max_length, naming the key
  from_labels = builders.label_captions(name)
  features = _open_builder(name, data_dir).info.features
  needed = [] if from_labels else [("config.text.feature", text.feature)]
  if text.embedding_feature is not None:
    needed.append(("config.text.embedding_feature", text.embedding_feature))
  for key, feature in needed:
    if feature not in features:
      raise ValueError(
          f"{key}={feature!r}: dataset {name!r} has no such feature (it has "
          f"{sorted(features.keys())})"
          + ("; the embedded datasets have captions from their labels but no "
             "precomputed text embeddings" if from_labels else ""))
  return from_labels


def _caption_tokens(element, label, rng, text: TextOptions, from_labels: bool):
  """Tokens int32 [max_length] of one element's caption."""
  if from_labels:
    caption = text_lib.digit_caption(label, text_lib.choose_template(rng))
  else:
    caption = element[text.feature]
    if isinstance(caption, np.ndarray):
      caption = caption.item()
  return text_lib.encode([caption], text.max_length)[0]


def _fix_hint(name: str, data_dir: str) -> str:
  return (
      "Prepare it beforehand, e.g. `tfds build "
      f"{name} --file_format=array_record --data_dir={data_dir}`, or set "
      "data.data_dir to where it is prepared. Built-in datasets "
      f"(prepared on demand): {sorted(builders.EMBEDDED)}."
  )


def _open_builder(name: str, data_dir: str | None):
  """Returns a builder for prepared array_record dataset `name`, or raises."""
  if name in builders.EMBEDDED:
    return builders.prepare(name, data_dir)
  where = data_dir or f"{tfds.core.constants.DATA_DIR} (TFDS default)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
        f"Unknown dataset {name!r}: not a TFDS dataset and not found in "
        f"data_dir {where}. " + _fix_hint(name, where)
    ) from None
  if not builder.is_prepared():
    raise ValueError(
        f"Dataset {name!r} is not prepared in data_dir {where}; the "
        "pipeline never downloads. " + _fix_hint(name, where)
    )
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f"Dataset {name!r} in data_dir {where} is stored as "
        f"{builder.info.file_format.value}, but random access needs "
        "array_record. " + _fix_hint(name, where)
    )
  return builder


def features(name: str, data_dir: str | os.PathLike | None = None):
  """The TFDS `FeaturesDict` of dataset `name` (prepared, or embedded)."""
  return _open_builder(name, None if data_dir is None else os.fspath(data_dir)).info.features


def get_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
) -> tuple[Any, DatasetInfo]:
  """Opens a random-access source over a prepared TFDS split.

  Built-in names (`builders.EMBEDDED`) are prepared on demand; any other name
  must already be prepared as array_record in `data_dir`.

  Args:
    name: TFDS dataset name, e.g. "sklearn_digits", "mnist", "celeb_a".
    split: TFDS split, e.g. "train", "test", "train[:90%]".
    data_dir: TFDS data dir; None means TFDS's default (`TFDS_DATA_DIR` or
      ~/tensorflow_datasets).
    image_size: if set, `info.image_shape` is (image_size, image_size, C).

  Returns:
    (source, info): `source[i]` is a dict of numpy arrays with at least
    "image" (uint8 [H,W,C], or float32 values).
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  builder = _open_builder(name, data_dir)
  features = builder.info.features
  if "image" not in features:
    raise ValueError(f"Dataset {name!r} has no 'image' feature.")
  height, width, channels = features["image"].shape
  dtype = features["image"].np_dtype
  if dtype not in (np.uint8, np.float32):
    raise ValueError(f"Dataset {name!r}: 'image' is {np.dtype(dtype).name}; expected uint8 "
                     "images or float32 values (used as they are)")
  if dtype == np.float32 and image_size:
    raise ValueError(f"Dataset {name!r} holds float32 values, not images: "
                     f"config.data.image_size={image_size} cannot resize them; set it to 0")
  if image_size:
    height = width = image_size
  elif height is None or width is None:
    raise ValueError(
        f"Dataset {name!r} has variable-size images; set data.image_size."
    )
  label = features["label"] if "label" in features else None
  num_classes = (
      label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
  )
  source = builder.as_data_source(split=split)
  info = DatasetInfo(
      image_shape=(height, width, channels),
      num_classes=num_classes,
      num_examples=len(source),
      kind="image" if dtype == np.uint8 else "values",
      label_captions=builders.label_captions(name),
  )
  return source, info


def _center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H,W,C] -> uint8 [size,size,C]: central square, then bicubic resize."""
  height, width, channels = image.shape
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  image = image[top : top + side, left : left + side]
  if side == size:
    return image
  # PIL wants 2-D arrays for single-channel images.
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  pil = pil.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(pil).reshape(size, size, channels)


def to_model_image(image: np.ndarray, image_size: int | None) -> np.ndarray:
  """uint8 [H,W,C] -> float32 [H',W',C] in [-1, 1], resized if image_size. float32
  data (e.g. ring8's 2-D points) passes through unchanged."""
  if image.dtype == np.float32:
    return image
  if image_size:
    image = _center_crop_resize(image, image_size)
  return image.astype(np.float32) / 127.5 - 1.0


def _preprocess(
    element: dict[str, Any],
    rng: np.random.Generator,
    *,
    image_size: int | None,
    random_flip: bool,
    conditional: bool,
    text: TextOptions | None = None,
    captions_from_labels: bool = False,
) -> dict[str, np.ndarray]:
  """Source element -> {"image": float32 [H,W,C], "label": int32 []} (+ "tokens" int32
  [max_length], "text_embedding" float32 when `text` asks for them)."""
  image = to_model_image(element["image"], image_size)
  if random_flip and rng.random() < 0.5:
    image = image[:, ::-1]
  label = element["label"] if conditional else 0
  out = {"image": np.ascontiguousarray(image), "label": np.int32(label)}
  if text is not None:
    # Drawn after the flip, so image batches are the same with or without text.
    out["tokens"] = _caption_tokens(element, element.get("label", 0), rng, text,
                                    captions_from_labels)
    if text.embedding_feature is not None:
      out["text_embedding"] = np.asarray(element[text.embedding_feature], np.float32)
  return out


def _derive_seeds(seed: int) -> tuple[int, int]:
  """(shuffle seed, augmentation seed), both uint32, from one user seed.

  grain shuffles epoch e with seed + e, so raw seeds s and s + 1 would share
  whole epochs; hashing the seed first keeps nearby seeds unrelated.
  """
  shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
  return int(shuffle_seed), int(augment_seed)


def _get(config: Any, key: str, default: Any) -> Any:
  value = getattr(config, key, default)
  return default if value is None else value


def make_train_iterator(
    data_config: Any,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    text: TextOptions | None = None,
) -> grain.DatasetIterator:
  """Infinite iterator of this process's share of each global training batch.

  Args:
    data_config: attribute object (e.g. ConfigDict) with `name`, `data_dir`,
      `split` ("train"), `batch_size` (global), `random_flip` (False),
      `image_size` (0 = native), `num_threads` (0 = main thread), `prefetch`.
    seed: fixes the shuffle order and augmentation; identical on all processes.
    process_index, process_count: default to jax.process_index()/count().
    text: `text_options(config)`; None: no text in the batches.

  Returns:
    A grain DatasetIterator (JSON-serialisable `get_state()`, `set_state()`)
    yielding {"image": float32 [b_local,H,W,C] in [-1, 1], "label": int32
    [b_local]} forever, b_local = batch_size // process_count, plus "tokens"
    int32 [b_local, max_length] (and "text_embedding" float32 [b_local, ...]) when
    `text` is given. Epochs are reshuffled, and batches may straddle epoch
    boundaries.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  batch_size = data_config.batch_size
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f"data.batch_size={batch_size} must be a positive multiple of the "
        f"process count {process_count}."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  image_size = _get(data_config, "image_size", 0) or None
  source, info = get_source(
      data_config.name,
      _get(data_config, "split", "train"),
      _get(data_config, "data_dir", None),
      image_size=image_size,
  )
  from_labels = (text is not None and _check_text_features(
      data_config.name, _get(data_config, "data_dir", None), text))
  shuffle_seed, augment_seed = _derive_seeds(seed)
  preprocess = functools.partial(
      _preprocess,
      image_size=image_size,
      random_flip=bool(_get(data_config, "random_flip", False)),
      conditional=info.num_classes > 0,
      text=text,
      captions_from_labels=from_labels,
  )
  local_batch = batch_size // process_count
  # Index i of `ds` below is the i-th element of the global stream: a
  # MapDataset shuffle indexed past its length (via repeat) uses a new
  # permutation per epoch, and random_map seeds each element's rng by
  # (augment_seed, i). Only then is the stream split between processes.
  ds = (
      grain.MapDataset.source(source)
      .shuffle(seed=shuffle_seed)
      .repeat()
      .random_map(preprocess, seed=augment_seed)
      .batch(local_batch, drop_remainder=True)
  )[process_index::process_count]
  read_options = grain.ReadOptions(
      num_threads=_get(data_config, "num_threads", 0),
      prefetch_buffer_size=_get(data_config, "prefetch", 0),
  )
  return iter(ds.to_iter_dataset(read_options))


def load_arrays(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """A whole (small) split in memory, in the split's stored order.

  Returns:
    images: float32 [N,H,W,C] in [-1, 1] (resized if image_size).
    labels: int32 [N]; zeros for unconditional datasets.
  """
  source, info = get_source(name, split, data_dir, image_size=image_size)
  elements = [source[i] for i in range(len(source))]
  images = np.stack([to_model_image(e["image"], image_size) for e in elements])
  labels = np.asarray(
      [e["label"] if info.num_classes else 0 for e in elements], np.int32
  )
  return images, labels


def load_text_arrays(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    text: TextOptions,
    image_size: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A whole (small) split with its captions, for evaluation (e.g. CLIP retrieval).

  Captions are the dataset's `text.feature`, or for the embedded digit datasets made
  from the labels with template indices drawn from `seed` (a fixed seed gives the
  same captions; all templates appear).

  Returns:
    images: float32 [N,H,W,C] in [-1, 1]; labels: int32 [N] (zeros for unconditional
    datasets); tokens: int32 [N, text.max_length].
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  from_labels = _check_text_features(name, data_dir, text)
  source, info = get_source(name, split, data_dir, image_size=image_size)
  elements = [source[i] for i in range(len(source))]
  images = np.stack([to_model_image(e["image"], image_size) for e in elements])
  labels = np.asarray(
      [e["label"] if info.num_classes else 0 for e in elements], np.int32
  )
  if from_labels:
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    templates = rng.integers(len(text_lib.TEMPLATES), size=len(elements))
    captions = text_lib.digit_captions(labels, templates)
  else:
    captions = [e[text.feature] for e in elements]
    captions = [c.item() if isinstance(c, np.ndarray) else c for c in captions]
  return images, labels, text_lib.encode(captions, text.max_length)
