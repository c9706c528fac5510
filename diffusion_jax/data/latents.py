"""Latent caches: a dataset split encoded once by a frozen autoencoder, for training
latent diffusion (Rombach et al. 2022) on the cached posteriors.

    info = latents.write_split("/data/latents/digits_ae", "sklearn_digits", "train",
                               data_dir, encode, params, flips=True)
    # config.data.name = "/data/latents/digits_ae": batches {"mean", "std", "label"}

`encode(params, images [B, H, W, C] in [-1, 1], labels int32 [B]) -> (mean, std)
[B, h, w, c]` is any diagonal-Gaussian encoder (the `Autoencoder` capability's, or a
hand-made one); this module knows no task. Per example the cache stores the posterior
N(mean, std²) of the raw latent, and with `flips` that of the horizontally flipped
image, so that training draws a fresh z = mean + std·ε (and a fresh flip) every step
instead of freezing one sample. Every non-image feature of the source (labels,
captions, ...) is carried over unchanged, in the source's order.

The result is a TFDS dataset directory (array_record shards, dataset_info.json,
features.json, metadata.json) that `tfds.builder_from_directory` and the grain pipeline
read. metadata.json's "latents" entry (`pipeline.LatentInfo`) holds the autoencoder's
spec, preset, scale and shift, the pixel and latent shapes, whether flips are stored,
and the scale factor measured from the data (`data_scale`, Rombach et al. 2022 §4.3.2:
1/std of the latents).

Storage: float32 by default: the cached posteriors are the encoder's outputs exactly.
float16 halves the disk (mean and std of a 32×32×4 latent, a 256² image under SD's
autoencoder, take 32 KiB in float32) at a relative rounding error of up to 2⁻¹¹ in
each; where the posterior std is small against |mean| (weakly KL-regularised
autoencoders) that rounding can exceed the std, so float16 is for when disk is the
limit. Batches are float32 either way, and the scale factor is measured from the stored
(rounded) values.

Layout and resuming: the N examples are cut into C = ⌈N / chunk_size⌉ chunks of
consecutive examples; chunk c is shard c of C (`{name}-{split}.array_record-
0000c-of-0000C`). Process p of P encodes the contiguous chunks [p·C/P, (p+1)·C/P) on
the global mesh (all processes step together, each feeding its own rows), writes each
finished chunk to a temporary file, renames it into place and then records it
(`_progress/chunk-0000c.json`: its example range and moments). A restarted run skips
recorded chunks, so an interrupted run resumes to a byte-identical dataset (the layout
depends only on N and chunk_size, not on P, so a resumed run may use other hosts).
When every chunk is done, process 0 combines the recorded moments in chunk order,
writes the metadata (dataset_info.json last: its presence marks a complete cache) and
removes `_progress/`. The output directory must be one every process sees: a shared
POSIX filesystem (renames are atomic) or a cloud bucket (`gs://...`; a chunk is
written to a local temporary file and uploaded as one object, which appears whole).
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import shutil
import tempfile
import types
from typing import Any, Callable, Mapping

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from tensorflow_datasets.core import dataset_info as tfds_info
from tensorflow_datasets.core import example_serializer, naming
from tensorflow_datasets.core import splits as tfds_splits
from tensorflow_datasets.core import utils as tfds_utils

from diffusion_jax import io, parallel
from diffusion_jax.data import builders, pipeline
from diffusion_jax.data.pipeline import (LATENT_FORMAT, LATENTS_KEY, PROGRESS_DIR, DatasetInfo,
                                         LatentInfo)

__all__ = ["DTYPES", "POSTERIOR_FEATURES", "LatentInfo", "array_features", "load_arrays",
           "scale_factor", "write", "write_split"]

DTYPES = ("float32", "float16")
# The features a cache adds; a source feature of one of these names is an error.
POSTERIOR_FEATURES = ("mean", "std", "flip_mean", "flip_std")
_VERSION = "1.0.0"
_CONFIG = "config.json"


class _Arrays:
  """A random-access source over a dict of equally long numpy arrays [N, ...]."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: len(v) for k, v in self._arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"source arrays differ in length: {lengths}")

  def __len__(self):
    return len(next(iter(self._arrays.values())))

  def __getitem__(self, i):
    return {k: v[i] for k, v in self._arrays.items()}


def array_features(arrays: Mapping[str, np.ndarray]) -> tfds.features.FeaturesDict:
  """The TFDS features of a dict-of-arrays source: "image" [N, H, W, C] (uint8 pixels or
  float32 in [−1, 1]) as a Tensor, "label" (integers) as a ClassLabel of max + 1
  classes, strings as Text, anything else as a Tensor of its per-example shape."""
  out = {}
  for key, a in arrays.items():
    a = np.asarray(a)
    if key == "label":
      if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"source array 'label' must hold integers, not {a.dtype}")
      out[key] = tfds.features.ClassLabel(num_classes=int(a.max()) + 1 if a.size else 1)
    elif a.dtype.kind in "USO":
      out[key] = tfds.features.Text()
    else:
      out[key] = tfds.features.Tensor(shape=a.shape[1:], dtype=a.dtype)
  return tfds.features.FeaturesDict(out)


def scale_factor(count: float, total: float, total_sq: float) -> tuple[float, float]:
  """(data_scale, data_shift) from the moments of the posteriors over `count` latent
  elements: total = Σ mean, total_sq = Σ (mean² + std²). For z = mean + std·ε,
  E[z] = total/count and E[z²] = total_sq/count (ε integrated out exactly), so
  data_scale = 1/sqrt(E[z²] − E[z]²) is 1/std of the sampled latents over the data
  (Rombach et al. 2022, §4.3.2, `scale_by_std`) and data_shift = E[z]."""
  shift = total / count
  var = total_sq / count - shift * shift
  if not var > 0:
    raise ValueError(f"the latents have variance {var} over {count} elements; no scale "
                     "factor makes them unit-variance")
  return 1.0 / math.sqrt(var), shift


def _moments(mean: np.ndarray, std: np.ndarray) -> dict:
  m, s = mean.astype(np.float64), std.astype(np.float64)
  return {"count": int(m.size), "sum": float(m.sum()), "sum_sq": float((m * m + s * s).sum())}


def _dataset_name(output_dir: str | os.PathLike) -> str:
  """The TFDS name of a cache: its directory's name (the parent's when that is a
  version, `<data_dir>/<name>/1.0.0`), as a snake_case identifier."""
  path = io.path(output_dir)
  base = path.name
  if tfds_utils.Version.is_valid(base):
    base = path.parent.name
  name = re.sub(r"\W+", "_", base).strip("_").lower() or "latents"
  return name if name[0].isalpha() else f"latents_{name}"


def _split_name(split: str) -> str:
  """The cache's split: the source split when it is a plain name, else "train"."""
  return split if re.fullmatch(r"[A-Za-z]\w*", split) else "train"


def _write_json(path: str | os.PathLike, value) -> None:
  """Writes `value` to `path` atomically (`io.write_atomic`; local or cloud)."""
  io.write_atomic(path, json.dumps(value, indent=1, sort_keys=True))


def _read_json(path: str | os.PathLike):
  return json.loads(io.path(path).read_text())


def _differences(want: dict, have: dict) -> list[str]:
  return [f"{k}={have.get(k)!r} (now {want[k]!r})" for k in want if have.get(k) != want[k]]


def _default_mesh():
  return parallel.make_mesh(types.SimpleNamespace(data=-1, fsdp=1))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"diffusion_jax.data.latents:{name}")


def _to_local(tree, mesh):
  """A batch-sharded global pytree → this process's rows (numpy)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  local = multihost_utils.global_array_to_host_local_array(
      tree, mesh, jax.tree.map(lambda _: P(parallel.BATCH_AXES), tree))
  return jax.tree.map(np.asarray, local)


def _replicate(params, mesh):
  """Parameters not yet on devices (numpy) → replicated jax.Arrays on `mesh`."""
  sharding = parallel.replicated(mesh)

  def put(a):
    if isinstance(a, jax.Array):
      return a
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

  return jax.tree.map(put, params)


def write(
    output_dir: str | os.PathLike,
    source: Any,
    encode: Callable,
    params: Any = None,
    *,
    features: tfds.features.FeaturesDict | None = None,
    flips: bool = False,
    dtype: str = "float32",
    batch_size: int = 64,
    chunk_size: int = 1024,
    mesh=None,
    image_size: int = 0,
    autoencoder: str = "",
    preset: str = "",
    scale: float = 1.0,
    shift: float = 0.0,
    source_name: str = "",
    split: str = "train",
    label_captions: bool = False,
    stop_after: int | None = None,
) -> DatasetInfo | None:
  """Encodes every example of `source` and writes the latent cache `output_dir`.

  Args:
    output_dir: the cache's directory (created; a TFDS dataset directory when done).
    source: a dict of arrays {"image": [N, H, W, C] uint8 or float32 in [−1, 1],
      "label": int [N], ...} or a random-access sequence of such per-example dicts
      (a TFDS data source, `pipeline.get_source`), with `features` its FeaturesDict.
    encode: encode(params, images float32 [B, H, W, C] in [−1, 1], labels int32 [B]
      (zeros for unlabelled data)) -> (mean, std) [B, *latent_shape] (e.g. [B, h, w,
      c]), traced under jit with the batch (B = batch_size) sharded over `mesh`.
    params: encode's first argument (numpy leaves are replicated onto `mesh`).
    features: the source's TFDS features (default: `array_features` of a dict
      source); every one but "image" is carried over.
    flips: also store the posterior of every image flipped horizontally (W axis).
    dtype: storage of mean and std, one of DTYPES (see the module docstring).
    batch_size: images per encode call over all processes; a multiple of the device
      count and of the process count.
    chunk_size: examples per chunk (the unit of resuming, and one shard file).
    mesh: the devices to encode on (default: all, data parallel); params may be
      sharded over it.
    image_size: config.data.image_size of the pixels (uint8 images are center-cropped
      and resized to it, `pipeline.to_model_image`; 0: native).
    autoencoder, preset, scale, shift: what `LatentInfo` records of the autoencoder
      (its spec, a weight file's preset, its own normalisation).
    source_name, split: the pixel dataset's name and split, recorded; the cache's
      split is `split` when a plain name (else "train").
    label_captions: captions are made from the labels (the embedded digit datasets).
    stop_after: return None after encoding this many rounds (one chunk per process)
      in this call, leaving the rest to a later call (tests; time-limited jobs).

  Returns:
    The cache's DatasetInfo (kind "latents", image_shape the latent shape, `latents`
    its LatentInfo); None when `stop_after` stopped it early. A complete cache written
    with the same settings is returned as it is; with other settings, or an
    unfinished one with other settings, it is an error naming the differences.
  """
  output_dir = io.path(os.path.expanduser(os.fspath(output_dir)))
  if isinstance(source, Mapping):
    features = array_features(source) if features is None else features
    source = _Arrays(source)
  elif features is None:
    raise ValueError("features: a sequence source needs its TFDS FeaturesDict "
                     "(e.g. data.features(name, data_dir))")
  if "image" not in features:
    raise ValueError(f"the source has no 'image' feature (it has {sorted(features.keys())})")
  clash = [k for k in features.keys() if k in POSTERIOR_FEATURES]
  if clash:
    raise ValueError(f"source features {clash} clash with the cache's own {POSTERIOR_FEATURES}")
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {DTYPES}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be positive")
  mesh = _default_mesh() if mesh is None else mesh
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if batch_size < 1 or batch_size % n_dev or batch_size % n_proc:
    raise ValueError(f"batch_size={batch_size} must be a positive multiple of the device "
                     f"count ({n_dev}) and of the process count ({n_proc})")
  n = len(source)
  if n == 0:
    raise ValueError(f"the source ({source_name or 'arrays'}, split {split!r}) holds no "
                     "examples")

  carried = {k: v for k, v in features.items() if k != "image"}
  label = carried.get("label")
  conditional = isinstance(label, tfds.features.ClassLabel)
  image_shape = tuple(int(d) for d in pipeline.to_model_image(
      np.asarray(source[0]["image"]), image_size or None).shape)
  local_batch = batch_size // n_proc
  encode_step = _compile(encode, mesh)
  params = _replicate(params, mesh)
  abstract = jax.eval_shape(
      encode, params, jax.ShapeDtypeStruct((batch_size,) + image_shape, np.float32),
      jax.ShapeDtypeStruct((batch_size,), np.int32))
  latent_shape = _check_posterior(abstract, batch_size)

  split_name = _split_name(split)
  name = _dataset_name(output_dir)
  tensor = lambda: tfds.features.Tensor(shape=latent_shape, dtype=np.dtype(dtype),
                                        encoding=tfds.features.Encoding.BYTES)
  posterior = ("mean", "std") + (("flip_mean", "flip_std") if flips else ())
  out_features = tfds.features.FeaturesDict(
      {**{k: tensor() for k in posterior}, **carried})
  settings = {
      "format": LATENT_FORMAT, "autoencoder": autoencoder, "preset": preset,
      "scale": float(scale), "shift": float(shift), "image_shape": list(image_shape),
      "latent_shape": list(latent_shape), "flips": bool(flips), "dtype": dtype,
      "source": source_name, "split": split, "image_size": int(image_size),
      "label_captions": bool(label_captions), "num_examples": n, "chunk_size": chunk_size,
      "features": {k: repr(v) for k, v in sorted(carried.items())},
  }

  progress = output_dir / PROGRESS_DIR
  if (output_dir / "dataset_info.json").exists():
    return _existing(output_dir, settings, split_name)
  held = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
  if held and not progress.is_dir():
    raise ValueError(f"output_dir={output_dir} is not empty and holds no latent cache "
                     f"(it has {held[:8]}); give a new directory")
  config_path = progress / _CONFIG
  if config_path.exists():
    diff = _differences(settings, _read_json(config_path))
    if diff:
      raise ValueError(f"output_dir={output_dir} holds an unfinished latent cache written "
                       f"with other settings: {', '.join(diff)}; finish it with the same "
                       "settings or give a new directory")
  _barrier("checked")
  if jax.process_index() == 0:
    progress.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
      _write_json(config_path, settings)
  _barrier("started")

  num_chunks = -(-n // chunk_size)
  bounds = lambda c: (c * chunk_size, min(n, (c + 1) * chunk_size))
  owned = [range(p * num_chunks // n_proc, (p + 1) * num_chunks // n_proc)
           for p in range(n_proc)]
  rounds = max(len(r) for r in owned)
  record = lambda c: progress / f"chunk-{c:05d}.json"
  mine = owned[jax.process_index()]
  local_done = np.array([r < len(mine) and record(mine[r]).exists()
                         for r in range(rounds)], bool)
  done = (local_done[None] if n_proc == 1 else
          np.asarray(multihost_utils.process_allgather(local_done)).reshape(n_proc, rounds))
  template = naming.ShardedFileTemplate(
      data_dir=output_dir, template=naming.DEFAULT_FILENAME_TEMPLATE, dataset_name=name,
      split=split_name, filetype_suffix="array_record")
  serializer = example_serializer.ExampleSerializer(out_features.get_serialized_info())
  num_classes = label.num_classes if conditional else 0
  # Element reads and preprocessing in threads (in order: deterministic).
  reader = concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))
  # Chunks are written beside their final name (a rename), or for a cloud output_dir in
  # a local temporary folder, then uploaded.
  scratch = tempfile.mkdtemp(prefix="latents-") if io.is_remote(output_dir) else progress
  worked, stopped = 0, False
  try:
    for r in range(rounds):
      todo = {p: owned[p][r] for p in range(n_proc) if r < len(owned[p]) and not done[p, r]}
      if not todo:
        continue
      steps = max(-(-(bounds(c)[1] - bounds(c)[0]) // local_batch) for c in todo.values())
      chunk = todo.get(jax.process_index())
      rows = range(*bounds(chunk)) if chunk is not None else range(0)
      arrays, kept = _encode_rows(source, rows, steps, encode_step, params, mesh, reader,
                                  carried=carried, flips=flips, image_shape=image_shape,
                                  image_size=image_size, num_classes=num_classes,
                                  local_batch=local_batch)
      if chunk is not None:
        arrays = {k: v.astype(dtype) for k, v in arrays.items()}
        path = template.sharded_filepath(shard_index=chunk, num_shards=num_chunks)
        size = _write_chunk(path, scratch, kept, arrays, out_features, serializer)
        _write_json(record(chunk), {"chunk": chunk, "start": rows.start, "stop": rows.stop,
                                    "bytes": size, **_moments(arrays["mean"], arrays["std"])})
      worked += 1
      if jax.process_index() == 0:
        logging.info("latents: round %d/%d (chunks %s of %d) written to %s", r + 1, rounds,
                     sorted(todo.values()), num_chunks, output_dir)
      if stop_after is not None and worked >= stop_after and r + 1 < rounds:
        stopped = True
        break
  finally:
    reader.shutdown()
    if scratch is not progress:
      shutil.rmtree(scratch, ignore_errors=True)
  if stopped:
    _barrier("stopped")
    return None

  _barrier("encoded")
  if jax.process_index() == 0:
    records = [_read_json(record(c)) for c in range(num_chunks)]
    _finish(output_dir, name, split_name, template, out_features, settings, records)
  _barrier("finished")
  return pipeline.get_source(os.fspath(output_dir), split_name)[1]


def _encode_rows(source, rows, steps, encode_step, params, mesh, reader, *, carried, flips,
                 image_shape, image_size, num_classes, local_batch):
  """Encodes examples `rows` of `source` in `steps` calls of `local_batch` rows (zero
  padded: every process makes the same calls). Returns ({"mean", "std"[, "flip_mean",
  "flip_std"]: [len(rows), ...]}, the carried features of each row). Images are read
  (in `reader`'s threads, in order) and preprocessed one batch at a time."""
  def read(i):
    element = source[i]
    image = pipeline.to_model_image(np.asarray(element["image"]), image_size or None)
    label = int(element["label"]) if num_classes else 0
    if not 0 <= label < max(num_classes, 1):
      raise ValueError(f"example {i}: label {label} is outside [0, {num_classes}) (the "
                       "'label' feature's classes)")
    return image, label, {k: element[k] for k in carried}

  outs, kept = {}, []
  for s in range(steps):
    batch = list(reader.map(read, rows[s * local_batch:(s + 1) * local_batch]))
    images = np.zeros((local_batch,) + image_shape, np.float32)
    labels = np.zeros((local_batch,), np.int32)
    for j, (image, label, features) in enumerate(batch):
      images[j], labels[j] = image, label
      kept.append(features)
    views = (("", images), ("flip_", np.ascontiguousarray(images[:, :, ::-1])))
    for prefix, x in views[:1 + bool(flips)]:
      glob = parallel.host_to_global({"image": x, "label": labels}, mesh)
      mean, std = _to_local(encode_step(params, glob["image"], glob["label"]), mesh)
      outs.setdefault(prefix + "mean", []).append(mean)
      outs.setdefault(prefix + "std", []).append(std)
  return {k: np.concatenate(v)[:len(rows)] for k, v in outs.items()}, kept


def _compile(encode, mesh):
  """jit of encode(params, images, labels) -> (mean, std), batch-sharded outputs. Flipped
  images go through the same program (flipped on the host), so a flipped image's
  posterior is exactly what encoding that image gives."""
  return jax.jit(encode, out_shardings=parallel.batch_sharding(mesh))


def _check_posterior(abstract, batch: int) -> tuple[int, ...]:
  """The latent shape of encode's (mean, std), or an error naming the shapes."""
  if not (isinstance(abstract, (tuple, list)) and len(abstract) == 2):
    raise ValueError("encode must return (mean, std) [B, h, w, c]; it returned "
                     f"{jax.tree.map(lambda a: a.shape, abstract)}")
  mean, std = abstract
  if mean.shape != std.shape or mean.shape[:1] != (batch,):
    raise ValueError(f"encode of a batch of {batch} returned mean {mean.shape} and std "
                     f"{std.shape}; expected two arrays [{batch}, h, w, c]")
  return tuple(int(d) for d in mean.shape[1:])


def _write_chunk(path, scratch, kept, arrays, out_features, serializer) -> int:
  """Writes one chunk's examples (posteriors `arrays`, carried features `kept`) to `path`
  atomically: array_record writes local files, so to a uniquely named temporary file in
  the local folder `scratch`, then a rename (local `path`, on the same filesystem) or
  one whole-object upload (a cloud `path`). Returns the chunk's size in bytes."""
  path = io.path(path)
  tmp = os.path.join(scratch, io.unique_tmp(path).name)
  try:
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
      for j, features in enumerate(kept):
        example = {k: arrays[k][j] for k in arrays}
        example.update(features)
        proto = serializer.get_tf_example(out_features.encode_example(example))
        writer.write(proto.SerializeToString(deterministic=True))
    finally:
      writer.close()
    size = os.path.getsize(tmp)
    io.move_file(tmp, path)
    return size
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _finish(output_dir, name, split_name, template, out_features, settings, records):
  """Process 0, every chunk done: the metadata, dataset_info.json last."""
  count = sum(r["count"] for r in records)
  total = sum(r["sum"] for r in records)  # in chunk order: deterministic
  total_sq = sum(r["sum_sq"] for r in records)
  data_scale, data_shift = scale_factor(count, total, total_sq)
  meta = {**settings, "data_scale": data_scale, "data_shift": data_shift}
  description = (f"Latent posteriors (mean, std{', and of flipped images' if settings['flips'] else ''}) "
                 f"of {settings['source'] or 'a dataset'} split {settings['split']!r}, encoded "
                 f"by {settings['autoencoder'] or 'an encoder'}"
                 f"{' (' + settings['preset'] + ')' if settings['preset'] else ''}.")
  identity = tfds_info.DatasetIdentity(name=name, version=tfds_utils.Version(_VERSION),
                                       data_dir=output_dir, module_name="")
  info = tfds_info.DatasetInfo(builder=identity, features=out_features,
                               description=description, disable_shuffling=True,
                               metadata=tfds.core.MetadataDict({LATENTS_KEY: meta}))
  info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD)
  info.set_splits(tfds_splits.SplitDict([tfds_splits.SplitInfo(
      name=split_name, shard_lengths=[r["stop"] - r["start"] for r in records],
      num_bytes=sum(r["bytes"] for r in records), filename_template=template)]))
  _write_metadata(info, output_dir, output_dir / PROGRESS_DIR / "metadata")
  (output_dir / PROGRESS_DIR).rmtree()
  logging.info("latents: %d examples in %s, data_scale %.6g", sum(
      r["stop"] - r["start"] for r in records), output_dir, data_scale)


def _write_metadata(info, output_dir, staging) -> None:
  """Writes a complete dataset's metadata files into `output_dir`, dataset_info.json last
  (`builders.install_files`), staged in `staging`, a folder on output_dir's filesystem
  (renames), or for a cloud output_dir in a local temporary folder (uploads)."""
  if io.is_remote(output_dir):
    with tempfile.TemporaryDirectory(prefix="metadata-") as tmp:
      info.write_to_directory(tmp)
      builders.install_files(tmp, output_dir)
    return
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  info.write_to_directory(staging)
  builders.install_files(staging, output_dir)
  shutil.rmtree(staging)


def _existing(output_dir, settings: dict, split_name: str) -> DatasetInfo:
  """The info of a complete cache written with `settings`, or an error."""
  path = io.path(output_dir) / "metadata.json"
  have = _read_json(path).get(LATENTS_KEY) if path.exists() else None
  if have is None:
    raise ValueError(f"output_dir={output_dir} holds a TFDS dataset that is no latent cache "
                     f"(no {LATENTS_KEY!r} in {path}); give a new directory")
  diff = _differences(settings, have)
  if diff:
    raise ValueError(f"output_dir={output_dir} already holds a latent cache written with "
                     f"other settings: {', '.join(diff)}; give a new directory")
  if jax.process_index() == 0:
    logging.info("latents: %s is complete; nothing to do", output_dir)
  return pipeline.get_source(os.fspath(output_dir), split_name)[1]


def write_split(output_dir: str | os.PathLike, name: str, split: str,
                data_dir: str | os.PathLike | None, encode: Callable, params: Any = None, *,
                image_size: int = 0, **kwargs) -> DatasetInfo | None:
  """`write` of a TFDS split (config.data.name `name`, in `data_dir`): its features,
  images (resized to `image_size` as the pipeline would) and whether captions come
  from labels are the dataset's. kwargs: those of `write`."""
  source, info = pipeline.get_source(name, split, data_dir, image_size=image_size or None)
  if info.kind == "latents":
    raise ValueError(f"{name!r} is a latent cache already; encode its pixel dataset "
                     f"{info.latents.source!r}")
  return write(output_dir, source, encode, params,
               features=pipeline.features(name, data_dir), image_size=image_size,
               source_name=name, split=split, label_captions=info.label_captions, **kwargs)


def load_arrays(name: str, split: str = "train",
                data_dir: str | os.PathLike | None = None) -> tuple[dict, DatasetInfo]:
  """A whole (small) latent cache split in memory, in stored (= source) order.

  Returns:
    ({"mean", "std" (and "flip_mean", "flip_std" when flips are stored): float32
    [N, h, w, c]; "label": int32 [N] (zeros for unconditional data)}, its DatasetInfo).
  """
  source, info = pipeline.get_source(name, split, data_dir)
  if info.kind != "latents":
    raise ValueError(f"Dataset {name!r} is no latent cache (kind {info.kind!r})")
  keys = ("mean", "std") + (("flip_mean", "flip_std") if info.latents.flips else ())
  elements = [source[i] for i in range(len(source))]
  out = {k: np.stack([np.asarray(e[k], np.float32) for e in elements]) for k in keys}
  out["label"] = np.asarray([e["label"] if info.num_classes else 0 for e in elements],
                            np.int32)
  return out, info

