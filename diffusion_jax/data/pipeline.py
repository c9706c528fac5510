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

A latent cache (`data/latents.py`, written by `diffusion-jax-encode`) is read like any
dataset, but its batches hold the posterior of each example's latent, {"mean", "std"}
float32 [B, h, w, c], instead of "image"; with config.data.random_flip the posterior
of the flipped image is taken where the image pipeline would flip (the same draw).
`DatasetInfo.kind` is then "latents" and `DatasetInfo.latents` says how it was made.

`config.data.name` is a TFDS name looked up in config.data.data_dir, or a path (absolute,
or starting with ./, ../ or ~, or a URI) of a prepared dataset's directory (the one
holding dataset_info.json, e.g. one written by `data/images.py`), opened as it is;
data.data_dir is then unused.

Subsets (any dataset with labels, latent caches included): config.data.labels keeps the
examples whose label is in it, then config.data.max_examples the first k of those in
the split's stored order (`get_source(..., labels=, max_examples=)`); the indices are a
function of the dataset alone, so every process keeps the same ones. Labels keep their
meaning (`DatasetInfo.num_classes` is the dataset's); `num_examples` is the kept count.

Paired batches (config.data.paired_name; DreamBooth's prior preservation, Ruiz et al.
2023, eq. 2): a second dataset with its own shuffle and augmentation seeds, the same
preprocessing and text options. Every process's batch of b_local = batch_size //
process_count is b_local/2 examples of data.name (exactly the stream a run of
batch_size/2 without paired_name reads) followed by b_local/2 of data.paired_name, each
stream cut between processes as above, and "paired" int32 [b_local] says which (0, 1);
data.split, image_size and random_flip apply to both, the subset keys to data.name only.
The global batch is then the processes' batches in order: the same examples for any
process count, in an order that interleaves the two datasets by process.

Evaluation reads a split in stored order through `open_arrays` (`Arrays`): batch by
batch, each process only the rows its devices hold, never the whole split in memory
(`load_arrays` is the whole of a small split at once).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from etils import epath
from PIL import Image
import tensorflow_datasets as tfds

from diffusion_jax import parallel
from diffusion_jax.data import builders, text as text_lib

__all__ = ["LATENTS_KEY", "LATENT_FORMAT", "PROGRESS_DIR", "Arrays", "DatasetInfo",
           "LatentInfo", "TextOptions", "features", "get_source", "is_path", "latent_info",
           "load_arrays", "load_text_arrays", "make_train_iterator", "open_arrays",
           "text_options", "to_model_image"]


# The latent cache's entry of a TFDS dataset's metadata.json (`data/latents.py`), and
# the folder of an unfinished cache's progress records.
LATENTS_KEY = "latents"
PROGRESS_DIR = "_progress"
LATENT_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class LatentInfo:
  """How a latent cache was made (`data/latents.py`; its metadata.json "latents").

  Attributes:
    autoencoder: the autoencoder's spec as the encoder was given it (a run's workdir or
      a weight file).
    preset: the architecture of a weight file (sd | sdxl | flux), "" for a run.
    scale, shift: the autoencoder's own normalisation z_scaled = scale·(z − shift)
      (Rombach et al. 2022, §4.3.2; 1 and 0 for an autoencoder without one).
    data_scale: 1/std of the raw latents z = mean + std·ε over the split (Rombach et
      al. 2022, §4.3.2, their `scale_by_std`), with ε integrated out exactly:
      1 / sqrt(mean(mean² + std²) − mean(mean)²) over every example and latent
      element of the unflipped posteriors (so it does not depend on `flips`).
    data_shift: mean(mean) over the same elements (the latents' mean; scaling with
      data_scale about it gives zero mean and unit variance).
    image_shape: (H, W, C) of the pixels that were encoded (after any resize).
    flips: the posterior of every image's horizontal flip is stored too.
    source, split, image_size: the pixel dataset (its config.data.name), split and
      config.data.image_size the latents were encoded from.
    dtype: how mean and std are stored ("float32" or "float16"); batches are float32.
  """

  autoencoder: str
  preset: str
  scale: float
  shift: float
  data_scale: float
  data_shift: float
  image_shape: tuple[int, int, int]
  flips: bool
  source: str = ""
  split: str = ""
  image_size: int = 0
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about one split, as the pipeline yields it.

  Attributes:
    image_shape: (H, W, C) after any resize; of a latent cache, the latent shape
      (h, w, c).
    num_classes: number of label classes; 0 for unconditional datasets.
    num_examples: number of examples in the split.
    kind: "image" (uint8 pixels, 1 or 3 channels make pictures), "values" (float32
      arrays used as they are, e.g. ring8's 2-D points) or "latents" (a latent cache:
      batches hold the posterior "mean" and "std", see `latents`).
    label_captions: captions come from the labels (the embedded digit datasets:
      `text.digit_caption`), so a label alone can be captioned.
    latents: how a latent cache was made (its autoencoder, scale factors, pixel
      shape); None for other datasets.
  """

  image_shape: tuple[int, int, int]
  num_classes: int
  num_examples: int
  kind: str = "image"
  label_captions: bool = False
  latents: LatentInfo | None = None

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
    templates: the caption templates of label-captioned datasets (config.text.templates;
      format fields {name} / {number}, both optional); () = `text.TEMPLATES`.
  """

  max_length: int
  feature: str = "caption"
  embedding_feature: str | None = None
  templates: tuple[str, ...] = ()


def text_options(config: Any) -> TextOptions:
  """The TextOptions of a full config's `text` section (a task whose batches carry
  text asks for them: `Task.text`)."""
  templates = tuple(getattr(config.text, "templates", ()) or ())
  text_lib.check_templates(templates)
  return TextOptions(
      max_length=int(config.text.max_length),
      feature=config.text.feature,
      embedding_feature=(config.text.embedding_feature
                         if config.text.encoder == "precomputed" else None),
      templates=templates,
  )


def _check_text_features(name: str, data_dir: str | None, text: TextOptions) -> bool:
  """Raises unless dataset `name` has the features `text` needs. Returns True when
  captions come from labels (the embedded digit datasets, and their latent caches)."""
  text_lib.encode([""], text.max_length)  # validates max_length, naming the key
  text_lib.check_templates(text.templates)
  builder = _open_builder(name, data_dir)
  from_labels = _label_captions(name, builder)
  features = builder.info.features
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
    templates = text.templates or None
    caption = text_lib.digit_caption(label, text_lib.choose_template(rng, templates),
                                     templates)
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


def is_path(name: str) -> bool:
  """Whether a config.data.name is a dataset directory rather than a TFDS name: an
  absolute path, one starting with ./, ../ or ~, or a URI (gs://...)."""
  return (os.path.isabs(name) or name.startswith(("./", "../", "~")) or "://" in name)


def _open_directory(name: str):
  """The read-only builder of the prepared dataset in directory `name`, or raises."""
  path = epath.Path(os.path.expanduser(name))
  if not (path / "dataset_info.json").exists():
    if (path / PROGRESS_DIR).exists():
      raise ValueError(
          f"data.name={name!r} is an unfinished latent cache (no dataset_info.json yet, "
          f"progress records in {path / PROGRESS_DIR}): rerun diffusion-jax-encode with "
          "the same flags to finish it")
    what = (f"it holds {sorted(p.name for p in path.iterdir())[:8]}" if path.is_dir()
            else "no such directory")
    raise ValueError(
        f"data.name={name!r} is a path, but not of a prepared TFDS dataset (a directory "
        f"with dataset_info.json): {what}. A TFDS name (no leading /, ./ or ~) is looked "
        "up in data.data_dir instead.")
  builder = tfds.builder_from_directory(path)
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f"Dataset {name!r} is stored as {builder.info.file_format.value}, but random "
        "access needs array_record.")
  return builder


def _open_builder(name: str, data_dir: str | None):
  """Returns a builder for prepared array_record dataset `name` (a TFDS name in
  `data_dir`, or a dataset directory: `is_path`), or raises."""
  if is_path(name):
    return _open_directory(name)
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


def _latent_metadata(builder) -> dict | None:
  """The "latents" entry of a prepared dataset's metadata.json, or None."""
  metadata = builder.info.metadata
  if metadata is None or LATENTS_KEY not in metadata:
    return None
  return dict(metadata[LATENTS_KEY])


def _label_captions(name: str, builder) -> bool:
  """Captions come from the labels: an embedded digit dataset or a latent cache of one."""
  meta = _latent_metadata(builder)
  if meta is not None:
    return bool(meta.get("label_captions", False))
  return builders.label_captions(name)


def latent_info(meta: dict) -> LatentInfo:
  """The LatentInfo of a latent cache's metadata entry (`LATENTS_KEY`)."""
  return LatentInfo(
      autoencoder=meta["autoencoder"], preset=meta["preset"], scale=float(meta["scale"]),
      shift=float(meta["shift"]), data_scale=float(meta["data_scale"]),
      data_shift=float(meta["data_shift"]), image_shape=tuple(meta["image_shape"]),
      flips=bool(meta["flips"]), source=meta.get("source", ""), split=meta.get("split", ""),
      image_size=int(meta.get("image_size", 0)), dtype=meta.get("dtype", "float32"))


def _latent_source(name: str, builder, split: str, image_size: int | None):
  """(source, DatasetInfo) of a latent cache's split."""
  meta = _latent_metadata(builder)
  features = builder.info.features
  missing = [k for k in ("mean", "std") + (("flip_mean", "flip_std") if meta.get("flips") else ())
             if k not in features]
  if meta.get("format") != LATENT_FORMAT or missing:
    raise ValueError(
        f"Dataset {name!r}: its metadata says it is a latent cache, but "
        + (f"it lacks the features {missing}" if missing else
           f"of format {meta.get('format')!r}, not {LATENT_FORMAT}")
        + "; re-encode it with diffusion-jax-encode")
  if image_size:
    raise ValueError(f"config.data.image_size={image_size}: dataset {name!r} is a latent "
                     "cache, whose latents cannot be resized; set it to 0 (the pixels were "
                     f"encoded at {tuple(meta['image_shape'])})")
  label = features["label"] if "label" in features else None
  num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0
  source = builder.as_data_source(split=split)
  info = DatasetInfo(
      image_shape=tuple(features["mean"].shape), num_classes=num_classes,
      num_examples=len(source), kind="latents",
      label_captions=bool(meta.get("label_captions", False)), latents=latent_info(meta))
  return source, info


class _Subset:
  """The examples `indices` of a random-access source, as a random-access source."""

  def __init__(self, source, indices: Sequence[int]):
    self._source, self._indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]

  def __getitems__(self, rows: Sequence[int]):
    return _read_elements(self._source, [int(self._indices[i]) for i in rows])


def _read_elements(source, rows: Sequence[int]) -> list:
  """source[i] for i in rows, in one batched read where the source has one (TFDS's
  array_record sources: `__getitems__`)."""
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__(list(rows)))
  return [source[i] for i in rows]


_SCAN_CHUNK = 1024  # examples per read of a label scan


def _label_indices(builder, split: str, keep: tuple[int, ...], max_examples: int) -> list[int]:
  """Indices (stored order) of the examples of `split` whose label is in `keep`, at most
  max_examples (0: all). Reads the labels only: every other feature's decoding is
  skipped (an encoded image stays bytes)."""
  features = builder.info.features
  skip = {k: tfds.decode.SkipDecoding() for k in features.keys() if k != "label"}
  source = builder.as_data_source(split=split, decoders=skip)
  wanted, found = set(keep), []
  for start in range(0, len(source), _SCAN_CHUNK):
    rows = range(start, min(len(source), start + _SCAN_CHUNK))
    for i, element in zip(rows, source.__getitems__(list(rows))):
      if int(element["label"]) in wanted:
        found.append(i)
        if len(found) == max_examples:
          return found
  return found


def _subset(name: str, builder, split: str, source, info: DatasetInfo,
            labels: Sequence[int], max_examples: int) -> tuple[Any, DatasetInfo]:
  """(source, info) restricted to config.data.labels / config.data.max_examples."""
  try:
    keep = tuple(int(y) for y in (labels or ()))
    max_examples = int(max_examples or 0)
  except (TypeError, ValueError):
    raise ValueError(f"config.data.labels={labels!r} must be a tuple of class indices and "
                     f"config.data.max_examples={max_examples!r} an integer") from None
  if max_examples < 0:
    raise ValueError(f"config.data.max_examples={max_examples} must be >= 0 (0: all)")
  if not keep and not max_examples:
    return source, info
  if keep:
    if not info.num_classes:
      raise ValueError(f"config.data.labels={keep}: dataset {name!r} has no labels (no "
                       "ClassLabel 'label' feature); set config.data.labels=()")
    bad = [y for y in keep if not 0 <= y < info.num_classes]
    if bad:
      raise ValueError(f"config.data.labels={keep}: {bad} not in 0..{info.num_classes - 1} "
                       f"(the classes of dataset {name!r})")
    indices = _label_indices(builder, split, keep, max_examples)
  else:
    indices = list(range(min(max_examples, len(source))))
  if not indices:
    raise ValueError(f"config.data.labels={keep} / config.data.max_examples={max_examples}: "
                     f"no example of dataset {name!r}, split {split!r} is kept")
  return _Subset(source, indices), dataclasses.replace(info, num_examples=len(indices))


def get_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    labels: Sequence[int] = (),
    max_examples: int = 0,
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
    labels: config.data.labels: keep only the examples with these labels (() = all).
    max_examples: config.data.max_examples: keep the first k examples (in stored
      order, after the label filter; 0 = all).

  Returns:
    (source, info): `source[i]` is a dict of numpy arrays with at least
    "image" (uint8 [H,W,C], or float32 values); of a latent cache (info.kind ==
    "latents") "mean" and "std" (and "flip_mean", "flip_std" when info.latents.flips)
    [h, w, c] instead. With a filter, `source` holds the kept examples in stored order
    and `info.num_examples` counts them (`info.num_classes` stays the dataset's).
  """
  return _source_of_builder(name, split, data_dir, image_size=image_size, labels=labels,
                            max_examples=max_examples)[:2]


def _source_of_builder(name, split, data_dir, *, image_size, labels, max_examples):
  """`get_source`'s (source, info), and the builder they came from."""
  data_dir = None if data_dir is None else os.fspath(data_dir)
  builder = _open_builder(name, data_dir)
  if _latent_metadata(builder) is not None:
    source, info = _latent_source(name, builder, split, image_size)
  else:
    source, info = _image_source(name, builder, split, image_size)
  source, info = _subset(name, builder, split, source, info, labels, max_examples)
  return source, info, builder


def _image_source(name: str, builder, split: str, image_size: int | None):
  """(source, DatasetInfo) of a dataset with an "image" feature."""
  features = builder.info.features
  if "image" not in features:
    hint = (" It has 'mean' and 'std' features but no latent-cache metadata (metadata.json "
            f"{LATENTS_KEY!r}, written last by diffusion-jax-encode): re-encode it."
            if "mean" in features and "std" in features else "")
    raise ValueError(f"Dataset {name!r} has no 'image' feature.{hint}")
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
  return _add_text(out, element, rng, text, captions_from_labels)


def _add_text(out, element, rng, text: TextOptions | None, captions_from_labels: bool):
  """`out` with "tokens" (and "text_embedding") added when `text` asks for them."""
  if text is not None:
    # Drawn after the flip, so image batches are the same with or without text.
    out["tokens"] = _caption_tokens(element, element.get("label", 0), rng, text,
                                    captions_from_labels)
    if text.embedding_feature is not None:
      out["text_embedding"] = np.asarray(element[text.embedding_feature], np.float32)
  return out


def _preprocess_latents(
    element: dict[str, Any],
    rng: np.random.Generator,
    *,
    random_flip: bool,
    conditional: bool,
    text: TextOptions | None = None,
    captions_from_labels: bool = False,
) -> dict[str, np.ndarray]:
  """Latent-cache element -> {"mean", "std": float32 [h,w,c], "label": int32 []} (+ text
  as `_preprocess`). The flip is the same draw as `_preprocess`'s: where the image
  pipeline flips the image, this takes the flipped image's posterior."""
  prefix = "flip_" if random_flip and rng.random() < 0.5 else ""
  label = element["label"] if conditional else 0
  out = {"mean": np.asarray(element[prefix + "mean"], np.float32),
         "std": np.asarray(element[prefix + "std"], np.float32),
         "label": np.int32(label)}
  return _add_text(out, element, rng, text, captions_from_labels)


def _derive_seeds(seed: int, stream: int = 0) -> tuple[int, int]:
  """(shuffle seed, augmentation seed), both uint32, from one user seed (and the
  stream: 0 for data.name, 1 for data.paired_name).

  grain shuffles epoch e with seed + e, so raw seeds s and s + 1 would share
  whole epochs; hashing the seed first keeps nearby seeds unrelated.
  """
  entropy = seed if stream == 0 else (seed, stream)
  shuffle_seed, augment_seed = np.random.SeedSequence(entropy).generate_state(2)
  return int(shuffle_seed), int(augment_seed)


def _get(config: Any, key: str, default: Any) -> Any:
  value = getattr(config, key, default)
  return default if value is None else value


def _element_stream(data_config: Any, name: str, *, seed: int, stream: int,
                    text: TextOptions | None, labels: Sequence[int] = (),
                    max_examples: int = 0) -> tuple[grain.MapDataset, DatasetInfo]:
  """The infinite, preprocessed element stream of dataset `name` (with data_config's
  split, data_dir, image_size, random_flip): index i is the i-th element of the global
  stream. Returns (stream, info)."""
  image_size = _get(data_config, "image_size", 0) or None
  data_dir = _get(data_config, "data_dir", None)
  source, info = get_source(name, _get(data_config, "split", "train"), data_dir,
                            image_size=image_size, labels=labels, max_examples=max_examples)
  from_labels = text is not None and _check_text_features(name, data_dir, text)
  shuffle_seed, augment_seed = _derive_seeds(seed, stream)
  random_flip = bool(_get(data_config, "random_flip", False))
  if info.kind == "latents":
    if random_flip and not info.latents.flips:
      raise ValueError(
          f"config.data.random_flip=True: the latent cache {name!r} stores no "
          "flipped posteriors (it was encoded without --flips); set "
          "config.data.random_flip=False or re-encode with diffusion-jax-encode --flips")
    preprocess = functools.partial(_preprocess_latents, random_flip=random_flip)
  else:
    preprocess = functools.partial(_preprocess, image_size=image_size,
                                   random_flip=random_flip)
  preprocess = functools.partial(
      preprocess,
      conditional=info.num_classes > 0,
      text=text,
      captions_from_labels=from_labels,
  )
  # A MapDataset shuffle indexed past its length (via repeat) uses a new permutation per
  # epoch, and random_map seeds each element's rng by (augment_seed, i).
  ds = (
      grain.MapDataset.source(source)
      .shuffle(seed=shuffle_seed)
      .repeat()
      .random_map(preprocess, seed=augment_seed)
  )
  return ds, info


def _join_halves(pair: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{k: [2, b, ...]} (data.name's b examples, then data.paired_name's) → {k: [2b, ...]}
  and "paired" int32 [2b] (0, then 1)."""
  out = {k: v.reshape((-1,) + v.shape[2:]) for k, v in pair.items()}
  half = next(iter(pair.values())).shape[1]
  out["paired"] = np.repeat(np.arange(2, dtype=np.int32), half)
  return out


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
      `image_size` (0 = native), `num_threads` (0 = main thread), `prefetch`,
      and optionally `labels` (()), `max_examples` (0): the subset of data.name
      (`get_source`), and `paired_name` (""): the second dataset of paired batches.
    seed: fixes the shuffle order and augmentation; identical on all processes.
    process_index, process_count: default to jax.process_index()/count().
    text: `text_options(config)`; None: no text in the batches.

  Returns:
    A grain DatasetIterator (JSON-serialisable `get_state()`, `set_state()`)
    yielding {"image": float32 [b_local,H,W,C] in [-1, 1], "label": int32
    [b_local]} forever, b_local = batch_size // process_count, plus "tokens"
    int32 [b_local, max_length] (and "text_embedding" float32 [b_local, ...]) when
    `text` is given. Epochs are reshuffled, and batches may straddle epoch
    boundaries. A latent cache (info.kind == "latents") yields {"mean", "std":
    float32 [b_local,h,w,c], "label"} (+ text) instead of "image": the posterior
    N(mean, std²) of each example's raw latent, of its flipped image where the image
    pipeline would flip it (random_flip needs a cache written with flips). With
    paired_name, rows [:b_local/2] are data.name's, rows [b_local/2:] paired_name's
    (each dataset's own labels and captions), and "paired" int32 [b_local] is 0 / 1.
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
  local_batch = batch_size // process_count
  paired_name = _get(data_config, "paired_name", "")
  if paired_name and local_batch % 2:
    raise ValueError(
        f"config.data.batch_size={batch_size} / {process_count} process(es) = {local_batch} "
        f"must be even with config.data.paired_name={paired_name!r} (half of every "
        "process's batch comes from each dataset)")
  ds, info = _element_stream(
      data_config, data_config.name, seed=seed, stream=0, text=text,
      labels=_get(data_config, "labels", ()),
      max_examples=_get(data_config, "max_examples", 0))
  if paired_name:
    paired, paired_info = _element_stream(data_config, paired_name, seed=seed, stream=1,
                                          text=text)
    if (paired_info.image_shape, paired_info.kind) != (info.image_shape, info.kind):
      raise ValueError(
          f"config.data.name={data_config.name!r} gives {info.kind} of shape "
          f"{info.image_shape}, but config.data.paired_name={paired_name!r} gives "
          f"{paired_info.kind} of shape {paired_info.image_shape}: paired batches need one "
          "shape (set config.data.image_size, or write the paired dataset at that size)")
    half = local_batch // 2
    # Pair k is (data.name's half-batch k, paired_name's half-batch k): each stream is
    # cut into half-batches and dealt to the processes as an unpaired stream would be.
    ds = (grain.MapDataset.mix([ds.batch(half, drop_remainder=True),
                                paired.batch(half, drop_remainder=True)])
          .batch(2, drop_remainder=True)
          .map(_join_halves))
  else:
    ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[process_index::process_count]
  read_options = grain.ReadOptions(
      num_threads=_get(data_config, "num_threads", 0),
      prefetch_buffer_size=_get(data_config, "prefetch", 0),
  )
  return iter(ds.to_iter_dataset(read_options))


@dataclasses.dataclass(frozen=True)
class Arrays:
  """The examples of a split as model arrays, read on demand in stored order, so that a
  split is never held whole (evaluation's real images: reference statistics, bits/dim,
  reconstructions). `open_arrays` opens a prepared split; `Arrays.of` wraps arrays
  already in memory.

  Attributes:
    read_rows: (start, stop) -> (images float32 [n, H, W, C] in [-1, 1], labels int32
      [n]) of examples start..stop-1 (0 <= start < stop <= num_examples).
    num_examples: how many examples.
    image_shape: (H, W, C) of one image (after any resize).
    name: a short label of the data, for file names and messages.
    key: what identifies the data, JSON-able (None for arrays in memory): the prepared
      dataset's directory and version, split, image size, subset and count, which a
      cache of numbers computed from the data is keyed on.
  """

  read_rows: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
  num_examples: int
  image_shape: tuple[int, ...]
  name: str = "arrays"
  key: dict | None = None

  @classmethod
  def of(cls, images, labels=None, name: str = "arrays") -> "Arrays":
    """Arrays in memory: images [N, H, W, C] (float32, as the model takes them) and
    labels [N] (default zeros)."""
    images = np.asarray(images)
    labels = (np.zeros(len(images), np.int32) if labels is None
              else np.asarray(labels, np.int32))
    if len(labels) != len(images):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return cls(lambda a, b: (images[a:b], labels[a:b]), len(images),
               tuple(images.shape[1:]), name)

  def __len__(self) -> int:
    return self.num_examples

  def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, H, W, C], labels [n]) of examples start..stop-1, clipped to the
    split (empty arrays of the right shape when nothing is left)."""
    start, stop = max(0, int(start)), min(int(stop), self.num_examples)
    if stop <= start:
      return np.zeros((0, *self.image_shape), np.float32), np.zeros((0,), np.int32)
    return self.read_rows(start, stop)

  def first(self, n: int) -> "Arrays":
    """The first min(n, len) examples."""
    n = min(int(n), self.num_examples)
    key = None if self.key is None else {**self.key, "num_examples": n}
    return dataclasses.replace(self, num_examples=n, key=key)

  def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, images, labels) of consecutive batches of at most batch_size examples."""
    if batch_size <= 0:
      raise ValueError(f"batch_size={batch_size} must be positive")
    for start in range(0, self.num_examples, batch_size):
      yield (start, *self.read(start, start + batch_size))

  def sharded_batches(self, batch_size: int, mesh) -> Iterator[tuple[int, int, dict]]:
    """(start, count, {"image", "label"}) of consecutive global batches of `count` <=
    batch_size examples: global jax.Arrays zero-padded to a multiple of the mesh's
    device count (`parallel.padded_size`) and sharded over its batch axes, of which
    each process reads only the rows its own devices hold (a host reads its share
    of the split, not all of it). The arrays are the same for any number of devices
    and processes; the next batch is read while the caller works on this one."""
    if batch_size <= 0:
      raise ValueError(f"batch_size={batch_size} must be positive")
    starts = range(0, self.num_examples, batch_size)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      ahead = pool.submit(self._local_rows, 0, batch_size, mesh) if starts else None
      for k, start in enumerate(starts):
        count, padded, lo, local = ahead.result()
        if k + 1 < len(starts):
          ahead = pool.submit(self._local_rows, starts[k + 1], batch_size, mesh)
        yield start, count, {key: _place(a, padded, lo, mesh)
                             for key, a in zip(("image", "label"), local)}

  def _local_rows(self, start: int, batch_size: int, mesh):
    """(count, padded size, first local row, this process's rows of the batch at
    start, zero-padded to its devices' span)."""
    count = min(batch_size, self.num_examples - start)
    padded = parallel.padded_size(count, mesh)
    spans = [idx[0].indices(padded)[:2] for idx in
             parallel.batch_sharding(mesh).addressable_devices_indices_map((padded,)).values()]
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    local = self.read(start + lo, start + min(hi, count))
    pad = lambda a: np.concatenate([a, np.zeros((hi - lo - len(a),) + a.shape[1:], a.dtype)])
    return count, padded, lo, tuple(pad(a) for a in local)


def _place(local: np.ndarray, padded: int, lo: int, mesh):
  """The global batch-sharded array [padded, ...] of which this process holds rows
  lo.. (`local`)."""
  def rows(idx):
    a, b, _ = idx[0].indices(padded)
    return local[(slice(a - lo, b - lo),) + tuple(idx[1:])]
  return jax.make_array_from_callback((padded,) + local.shape[1:],
                                      parallel.batch_sharding(mesh), rows)


def open_arrays(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    labels: Sequence[int] = (),
    max_examples: int = 0,
) -> Arrays:
  """A prepared split (`get_source`: a TFDS name in data_dir or a dataset directory;
  labels, max_examples: the subset to keep) as `Arrays`, read on demand: images
  float32 [n,H,W,C] in [-1, 1] (resized if image_size), labels int32 [n] (zeros for
  unconditional datasets)."""
  source, info, builder = _source_of_builder(name, split, data_dir, image_size=image_size,
                                             labels=labels, max_examples=max_examples)
  _refuse_latents(name, info)
  conditional = info.num_classes > 0

  def read_rows(start: int, stop: int):
    elements = _read_elements(source, range(start, stop))
    images = np.stack([to_model_image(e["image"], image_size) for e in elements])
    kept = np.asarray([e["label"] if conditional else 0 for e in elements], np.int32)
    return images, kept

  key = {"name": name, "dir": os.fspath(builder.data_dir),
         "version": str(builder.info.version), "split": split,
         "image_size": int(image_size or 0), "labels": [int(y) for y in labels or ()],
         "max_examples": int(max_examples or 0), "num_examples": info.num_examples}
  short = os.path.basename(os.path.normpath(name)) if is_path(name) else name
  return Arrays(read_rows, info.num_examples, tuple(info.image_shape), short, key)


def load_arrays(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    labels: Sequence[int] = (),
    max_examples: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """A whole (small) split in memory, in the split's stored order (`open_arrays` reads
  a large one batch by batch).

  labels, max_examples: the subset to keep (config.data.labels, .max_examples;
  `get_source`); by default every example.

  Returns:
    images: float32 [N,H,W,C] in [-1, 1] (resized if image_size).
    labels: int32 [N]; zeros for unconditional datasets.
  """
  arrays = open_arrays(name, split, data_dir, image_size=image_size, labels=labels,
                       max_examples=max_examples)
  return arrays.read(0, len(arrays))


def load_text_arrays(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    text: TextOptions,
    image_size: int | None = None,
    seed: int = 0,
    labels: Sequence[int] = (),
    max_examples: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A whole (small) split with its captions, for evaluation (e.g. CLIP retrieval).

  Captions are the dataset's `text.feature`, or for the embedded digit datasets made
  from the labels with template indices (into `text.templates`, default
  `text.TEMPLATES`) drawn from `seed` (a fixed seed gives the same captions; all
  templates appear). labels, max_examples: the subset to keep, as for `load_arrays`.

  Returns:
    images: float32 [N,H,W,C] in [-1, 1]; labels: int32 [N] (zeros for unconditional
    datasets); tokens: int32 [N, text.max_length].
  """
  data_dir = None if data_dir is None else os.fspath(data_dir)
  from_labels = _check_text_features(name, data_dir, text)
  source, info = get_source(name, split, data_dir, image_size=image_size, labels=labels,
                            max_examples=max_examples)
  _refuse_latents(name, info)
  elements = [source[i] for i in range(len(source))]
  images = np.stack([to_model_image(e["image"], image_size) for e in elements])
  labels = np.asarray(
      [e["label"] if info.num_classes else 0 for e in elements], np.int32
  )
  if from_labels:
    texts = text.templates or text_lib.TEMPLATES
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    templates = rng.integers(len(texts), size=len(elements))
    captions = text_lib.digit_captions(labels, templates, texts)
  else:
    captions = [e[text.feature] for e in elements]
    captions = [c.item() if isinstance(c, np.ndarray) else c for c in captions]
  return images, labels, text_lib.encode(captions, text.max_length)


def _refuse_latents(name: str, info: DatasetInfo) -> None:
  if info.kind == "latents":
    raise ValueError(
        f"Dataset {name!r} is a latent cache, which holds no images: its pixels are "
        f"dataset {info.latents.source!r}, split {info.latents.split!r} "
        "(`data.latents.load_arrays` reads the latents)")


def pictures(data_config: Any, info: DatasetInfo) -> tuple[str, str | None, int | None, DatasetInfo]:
  """The pixel dataset behind a run's data, for what compares pictures (evaluation's
  reference images, classifiers of samples): (name, data_dir, image_size, info of its
  pictures). A latent cache's is the dataset it was encoded from (`LatentInfo.source`,
  looked up in config.data.data_dir, at its encoding size); any other's is itself."""
  if info.kind != "latents":
    return (data_config.name, data_config.data_dir, data_config.image_size or None, info)
  lat = info.latents
  if not lat.source:
    raise ValueError(f"the latent cache {data_config.name!r} does not record the dataset it "
                     "was encoded from; pixel references are unavailable")
  pixel_info = dataclasses.replace(info, image_shape=tuple(lat.image_shape), kind="image",
                                   latents=None)
  return lat.source, data_config.data_dir, lat.image_size or None, pixel_info
