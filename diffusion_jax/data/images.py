"""Few-image datasets: a folder of pictures, or an .npz of arrays, written as a prepared
TFDS dataset directory that the pipeline reads like any other (config.data.name =
the directory; `pipeline.is_path`). The data of personalisation: the handful of
pictures of one subject that textual inversion (Gal et al. 2022) and DreamBooth (Ruiz
et al. 2023) fine-tune on, and DreamBooth's class images for prior preservation.

    images.write("photos/", "/data/my_dog", image_size=64)   # captions beside the files
    images.write("class.npz", "/data/class_dog", caption="a photo of a dog")
    # config.data.name = "/data/my_dog"; config.text.feature = "caption"

Inputs and the output may be local paths or cloud URIs (`gs://…`, through `io.path`):
the shard is written to a local temporary file and uploaded as one object.

Inputs:
  - A folder of PNG / JPEG files (.png, .jpg, .jpeg; sorted by file name; EXIF
    orientation applied). Captions come from a Hugging Face imagefolder
    `metadata.jsonl` (one JSON object per line, {"file_name": ..., "text": ...},
    optionally "label": an int), or else a `<stem>.txt` beside each image, or else
    the `caption` argument for every image. Pictures are 1-channel when every file
    is grayscale, else RGB (an alpha channel is dropped).
  - An .npz with "images" (uint8 [N, H, W, C], or float in [−1, 1]), and optionally
    "labels" (int [N]; all −1, as diffusion-jax-sample writes for an unconditional
    model, means none) and "captions" (str [N]); other arrays (diffusion-jax-sample's
    "values") are ignored.

The dataset has one split, "train", in input order (`disable_shuffling`), with the
features "image" (PNG-encoded uint8 [H, W, C], C = 1 or 3), "label" (a ClassLabel of
`num_classes` classes, or max label + 1) when there are labels, and "caption" (Text)
when there are captions. Every picture must have one size unless `image_size` is
given: then each is center-cropped to a square and resized (bicubic) to image_size,
as config.data.image_size does (`pipeline.to_model_image`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps
from tensorflow_datasets.core import dataset_info as tfds_info
from tensorflow_datasets.core import example_serializer, naming
from tensorflow_datasets.core import splits as tfds_splits
from tensorflow_datasets.core import utils as tfds_utils

from diffusion_jax import io
from diffusion_jax.data import latents, pipeline

__all__ = ["EXTENSIONS", "METADATA", "IMAGES_KEY", "read_folder", "read_npz", "write",
           "write_examples"]

EXTENSIONS = (".png", ".jpg", ".jpeg")
METADATA = "metadata.jsonl"  # Hugging Face imagefolder's captions (and labels)
IMAGES_KEY = "images"  # this writer's entry of metadata.json
_SPLIT = "train"
_VERSION = "1.0.0"
_STAGING = ".incomplete"
_GRAY = ("1", "L", "LA", "I", "I;16", "F")


def _read_metadata(folder: str, names: Sequence[str]) -> dict[str, dict]:
  """{file_name: entry} of folder/metadata.jsonl, every image in `names` present."""
  path = io.path(folder) / METADATA
  entries = {}
  with path.open("r", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}, line {number}"
      try:
        entry = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
      if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
        raise ValueError(f"{where}: expected an object with a string \"file_name\", got "
                         f"{line.strip()[:80]}")
      name = os.path.normpath(entry["file_name"])
      if name in entries:
        raise ValueError(f"{where}: {entry['file_name']!r} is listed twice")
      if "text" in entry and not isinstance(entry["text"], str):
        raise ValueError(f"{where}: \"text\" must be a string, got {entry['text']!r}")
      label = entry.get("label")
      if "label" in entry and not (isinstance(label, int) and not isinstance(label, bool)
                                   and label >= 0):
        raise ValueError(f"{where}: \"label\" must be an integer >= 0, got {label!r}")
      entries[name] = entry
  missing = [n for n in names if n not in entries]
  if missing:
    raise ValueError(f"{path} lists no entry for {missing[:5]} (every image needs one)")
  extra = sorted(set(entries) - set(names))
  if extra:
    raise ValueError(f"{path} lists {extra[:5]}, which are not images in {folder} "
                     f"({', '.join(EXTENSIONS)})")
  return entries


def _all_or_none(values: Sequence[Any], names: Sequence[str], what: str, where: str):
  """values (None where missing) → the list, or None if all are missing; an error
  naming the files when only some are."""
  if all(v is None for v in values):
    return None
  lacking = [n for n, v in zip(names, values) if v is None]
  if lacking:
    raise ValueError(f"{where}: {lacking[:5]} have no {what}, the other images do; give "
                     "every image one or none")
  return list(values)


def read_folder(folder: str) -> tuple[list[Image.Image], list[str], list[str] | None,
                                      list[int] | None]:
  """(pictures, their file names, captions or None, labels or None) of a folder of
  PNG / JPEG files (local or a cloud URI), sorted by name (see the module docstring)."""
  root = io.path(folder)
  if not root.is_dir():
    raise ValueError(f"input={folder!r}: no such folder (or .npz file)")
  held = {p.name: p for p in root.iterdir()}
  names = sorted(n for n, p in held.items() if n.lower().endswith(EXTENSIONS) and p.is_file())
  if not names:
    raise ValueError(f"input={folder!r} holds no images ({', '.join(EXTENSIONS)}); it has "
                     f"{sorted(held)[:8]}")
  pictures = []
  for name in names:
    try:
      with held[name].open("rb") as f, Image.open(f) as im:
        im.load()
        pictures.append(ImageOps.exif_transpose(im))
    except (OSError, ValueError) as e:
      raise ValueError(f"{held[name]}: not a readable image ({e})") from None
  texts = [None] * len(names)
  labels = [None] * len(names)
  if METADATA in held:
    entries = _read_metadata(folder, names)
    texts = [entries[n].get("text") for n in names]
    labels = [entries[n].get("label") for n in names]
  where = os.fspath(root / METADATA)
  captions = _all_or_none(texts, names, '"text"', where)
  side = [os.path.splitext(n)[0] + ".txt" for n in names]
  if any(p in held for p in side):
    if captions is not None:
      raise ValueError(f"input={folder!r} has captions in {METADATA} and in .txt files; "
                       "keep one")
    captions = _all_or_none(
        [held[p].read_text(encoding="utf-8").strip() if p in held else None for p in side],
        names, "<stem>.txt caption", f"input={folder!r}")
  return pictures, names, captions, _all_or_none(labels, names, '"label"', where)


def _to_array(picture: Image.Image, mode: str) -> np.ndarray:
  """A picture → uint8 [H, W, C] in `mode` (L: C = 1, RGB: C = 3)."""
  if picture.mode in ("I", "I;16", "F") and mode == "L":  # 16-bit / float grayscale
    a = np.asarray(picture, np.float64)
    a = a / 257.0 if a.max() > 255 else a
    return np.clip(np.round(a), 0, 255).astype(np.uint8)[..., None]
  a = np.asarray(picture.convert(mode), np.uint8)
  return a[..., None] if a.ndim == 2 else a


def read_npz(path: str) -> tuple[np.ndarray, list[str] | None, np.ndarray | None]:
  """(images uint8 [N, H, W, C], captions or None, labels int64 [N] or None) of an .npz
  (see the module docstring; diffusion-jax-sample's output is one)."""
  try:
    with io.path(path).open("rb") as fh, np.load(fh) as f:
      arrays = {k: f[k] for k in f.files if k in ("images", "labels", "captions")}
  except (OSError, ValueError) as e:
    raise ValueError(f"input={path!r}: cannot read it as an .npz of arrays ({e})") from None
  if "images" not in arrays:
    raise ValueError(f"input={path!r} has no array 'images'")
  images = arrays["images"]
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
    raise ValueError(f"input={path!r}: 'images' must be [N, H, W, C] with N >= 1 and C = 1 or "
                     f"3, got shape {images.shape}")
  if images.dtype == np.uint8:
    pass
  elif images.dtype.kind == "f":
    lo, hi = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(lo) and np.isfinite(hi) and -1 - 1e-6 <= lo and hi <= 1 + 1e-6):
      raise ValueError(f"input={path!r}: float 'images' must be in [-1, 1], got [{lo}, {hi}]")
    images = np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  else:
    raise ValueError(f"input={path!r}: 'images' must be uint8 or float in [-1, 1], got "
                     f"{images.dtype}")
  n = len(images)
  labels = captions = None
  if "labels" in arrays:
    labels = arrays["labels"]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"input={path!r}: 'labels' must be integers [{n}], got "
                       f"{labels.dtype} {labels.shape}")
    if np.all(labels < 0):
      labels = None  # an unconditional model's samples
    elif np.any(labels < 0):
      raise ValueError(f"input={path!r}: 'labels' mixes classes with -1 (no label) at "
                       f"{np.flatnonzero(labels < 0)[:5].tolist()}; give all or none")
    else:
      labels = labels.astype(np.int64)
  if "captions" in arrays:
    c = arrays["captions"]
    if c.shape != (n,) or c.dtype.kind not in "US":
      raise ValueError(f"input={path!r}: 'captions' must be strings [{n}], got {c.dtype} "
                       f"{c.shape}")
    captions = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in c.tolist()]
  return images, captions, labels


def write_examples(output_dir: str | os.PathLike, examples: Sequence[Mapping[str, Any]],
                   features: tfds.features.FeaturesDict, *, description: str = "",
                   metadata: Mapping[str, Any] | None = None) -> None:
  """Writes `examples` (dicts `features` encodes) as a prepared TFDS directory: one
  array_record shard of split "train" in the given order, then the metadata files,
  dataset_info.json last (its presence marks a complete dataset). The shard is
  written as `latents.write` writes its chunks (a temporary file, then a rename, or
  for a cloud output_dir one upload)."""
  output_dir = os.fspath(output_dir)
  name = latents._dataset_name(output_dir)  # pylint: disable=protected-access
  remote = io.is_remote(output_dir)
  # The shard is staged beside the dataset (renames), or locally for a cloud output_dir.
  staging = tempfile.mkdtemp(prefix="images-") if remote else os.path.join(output_dir, _STAGING)
  try:
    if not remote:
      shutil.rmtree(staging, ignore_errors=True)
      os.makedirs(staging)
    template = naming.ShardedFileTemplate(
        data_dir=output_dir, template=naming.DEFAULT_FILENAME_TEMPLATE, dataset_name=name,
        split=_SPLIT, filetype_suffix="array_record")
    path = os.fspath(template.sharded_filepath(shard_index=0, num_shards=1))
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    size = latents._write_chunk(path, staging, list(examples), {}, features, serializer)  # pylint: disable=protected-access
    identity = tfds_info.DatasetIdentity(name=name, version=tfds_utils.Version(_VERSION),
                                         data_dir=output_dir, module_name="")
    info = tfds_info.DatasetInfo(
        builder=identity, features=features, description=description, disable_shuffling=True,
        metadata=tfds.core.MetadataDict(metadata or {}))
    info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD)
    info.set_splits(tfds_splits.SplitDict([tfds_splits.SplitInfo(
        name=_SPLIT, shard_lengths=[len(examples)], num_bytes=size,
        filename_template=template)]))
    latents._write_metadata(info, output_dir, os.path.join(staging, "metadata"))  # pylint: disable=protected-access
    shutil.rmtree(staging)
  finally:
    if remote:
      shutil.rmtree(staging, ignore_errors=True)


def write(input: str | os.PathLike, output_dir: str | os.PathLike, *,  # pylint: disable=redefined-builtin
          caption: str | None = None, image_size: int | None = None,
          num_classes: int = 0) -> pipeline.DatasetInfo:
  """Writes the few-image dataset of `input` to `output_dir` (see the module docstring).

  Args:
    input: a folder of PNG / JPEG files, or an .npz file (local or a cloud URI).
    output_dir: the dataset's directory (created; must be new or empty; local or a
      cloud URI, gs://...).
    caption: the caption of every image, for inputs without captions of their own.
    image_size: center-crop and resize every picture to image_size × image_size
      (None / 0: keep the size, which must then be the same for all).
    num_classes: the classes of the "label" feature (0: max label + 1); needs labels.

  Returns:
    The DatasetInfo of the written split "train" (`pipeline.get_source`).
  """
  input = os.fspath(io.path(os.path.expanduser(os.fspath(input))))
  output_dir = os.fspath(io.path(os.path.expanduser(os.fspath(output_dir))))
  out = io.path(output_dir)
  # (An interrupted write leaves only its staging folder, which a rerun replaces.)
  if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - {_STAGING}):
    raise ValueError(f"output_dir={output_dir} exists and is not an empty directory; give "
                     "a new one (or remove it)")
  if image_size is not None and image_size < 0:
    raise ValueError(f"image_size={image_size} must be > 0 (or 0 / None: keep the size)")
  if num_classes < 0:
    raise ValueError(f"num_classes={num_classes} must be >= 0 (0: max label + 1)")
  if caption is not None and not isinstance(caption, str):
    raise ValueError(f"caption={caption!r} must be a string")
  files = None
  if input.lower().endswith(".npz"):
    arrays, captions, labels = read_npz(input)
    names = [f"{input}, image {i}" for i in range(len(arrays))]
  else:
    pictures, files, captions, labels = read_folder(input)
    mode = "L" if all(p.mode in _GRAY for p in pictures) else "RGB"
    arrays = [_to_array(p, mode) for p in pictures]
    names = [os.path.join(input, f) for f in files]
  if image_size:
    arrays = [pipeline._center_crop_resize(a, image_size) for a in arrays]  # pylint: disable=protected-access
  shape = arrays[0].shape
  for a, name in zip(arrays, names):
    if a.shape != shape:
      raise ValueError(f"{name} is {a.shape[1]}×{a.shape[0]} ({a.shape[2]} channel(s)), "
                       f"but {names[0]} is {shape[1]}×{shape[0]} ({shape[2]}): all images "
                       "need one size, or give image_size (center crop + resize)")
  if caption is not None:
    if captions is not None:
      raise ValueError(f"caption={caption!r}, but input={input!r} has captions of its own; "
                       "give one or the other")
    captions = [caption] * len(arrays)

  columns: dict[str, np.ndarray] = {}
  if labels is not None:
    labels = np.asarray(labels, np.int64)
    if num_classes and labels.max() >= num_classes:
      bad = [n for n, y in zip(names, labels) if y >= num_classes]
      raise ValueError(f"num_classes={num_classes}: {bad[:5]} have labels "
                       f"{sorted(set(labels[labels >= num_classes].tolist()))} >= num_classes")
    columns["label"] = labels
  elif num_classes:
    raise ValueError(f"num_classes={num_classes}, but input={input!r} has no labels (a "
                     f"\"label\" in {METADATA}, or an .npz 'labels' array)")
  if captions is not None:
    columns["caption"] = np.asarray(captions, dtype=object)
  features = dict(latents.array_features(columns)) if columns else {}
  if labels is not None and num_classes:
    features["label"] = tfds.features.ClassLabel(num_classes=num_classes)
  features["image"] = tfds.features.Image(shape=shape, encoding_format="png")
  features = tfds.features.FeaturesDict(features)
  examples = []
  for i, a in enumerate(arrays):
    example = {"image": Image.fromarray(a[..., 0] if shape[-1] == 1 else a)}
    example.update({k: v[i] for k, v in columns.items()})
    examples.append(example)
  what = (f"{len(arrays)} images {shape} from {input}"
          + (f", resized to {image_size}" if image_size else ""))
  out.mkdir(parents=True, exist_ok=True)
  write_examples(output_dir, examples, features, description=f"A few-image dataset: {what}.",
                 metadata={IMAGES_KEY: {"input": input,
                                        "image_size": int(image_size or 0),
                                        "files": files}})
  return pipeline.get_source(output_dir, _SPLIT)[1]
