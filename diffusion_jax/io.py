"""The edges: paths (local or cloud), crash-consistent files, images ([-1, 1] floats ↔
uint8, grids, PNG files) and small tensor files (.safetensors).

Every path the library and the launchers read or write goes through `path` — an
`etils.epath.Path`, the abstraction orbax and TFDS use — so a workdir, a data_dir or a
weight file may be local or a cloud URI (`gs://bucket/run`; install the `[gcs]` extra,
which brings gcsfs). Writers that must never leave a torn file use `write_atomic`.
"""
from __future__ import annotations

import contextlib
import io as _io
import os
import shutil
import tempfile
import uuid

import fsspec.config
import numpy as np
from etils import epath
from PIL import Image

PathLike = str | os.PathLike

# gcsfs caches directory listings for the life of a process, so files another process
# (host) adds to a gs:// folder would stay invisible to `exists()` and `iterdir()`:
# a resume, `runs.load` of a run still training, hosts reading each other's progress.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


def path(p: PathLike) -> epath.Path:
  """p as an `epath.Path`: local paths are made absolute (`~` expanded), URIs
  (`gs://…`) kept as given."""
  if is_remote(p):
    return epath.Path(p)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def is_remote(p: PathLike) -> bool:
  """True for a URI with a scheme (`gs://b/x`, `s3://…`), False for a local path."""
  return "://" in os.fspath(p)


def unique_tmp(p: PathLike) -> epath.Path:
  """A temporary name beside p that no other writer uses (`<name>.tmp-<uuid>`)."""
  p = path(p)
  return p.parent / f"{p.name}.tmp-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def local_file(p: PathLike):
  """A local file name for p: p itself when local; for a cloud URI a temporary local
  copy, removed on exit (for readers that need a real file, e.g. a memory map)."""
  if not is_remote(p):
    yield os.fspath(path(p))
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, path(p).name)
    with path(p).open("rb") as r, open(local, "wb") as w:
      shutil.copyfileobj(r, w)
    yield local


def move_file(local: PathLike, dst: PathLike) -> epath.Path:
  """Moves the local file `local` to dst: a rename when dst is local (the same
  filesystem), else one streamed whole-object upload, then the local file removed.
  For files a library writes only locally (array_record shards, profiler traces)."""
  dst = path(dst)
  if not is_remote(dst):
    os.replace(local, dst)
    return dst
  with open(local, "rb") as r, dst.open("wb") as w:
    shutil.copyfileobj(r, w)
  os.remove(local)
  return dst


def upload_tree(local_dir: PathLike, dst: PathLike) -> None:
  """Moves every file under the local directory `local_dir` to the same relative path
  under `dst` (local or cloud; `move_file`)."""
  for dirpath, _, files in os.walk(local_dir):
    for name in files:
      src = os.path.join(dirpath, name)
      target = path(dst) / os.path.relpath(src, local_dir)
      target.parent.mkdir(parents=True, exist_ok=True)
      move_file(src, target)


def move_tree(src: PathLike, dst: PathLike) -> epath.Path:
  """Moves the directory src to dst (which must not exist): a rename locally; on cloud
  storage, which has no rename, every object copied and then the source deleted."""
  src, dst = path(src), path(dst)
  if not is_remote(src) and not is_remote(dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    return dst
  def copy(a, b):  # one listing per folder (cloud storage refuses `**` globs)
    for f in a.iterdir():
      if f.is_dir():
        copy(f, b / f.name)
      else:
        b.mkdir(parents=True, exist_ok=True)
        (b / f.name).write_bytes(f.read_bytes())
  copy(src, dst)
  src.rmtree()
  return dst


def write_atomic(p: PathLike, data: bytes | str) -> epath.Path:
  """Writes data (bytes, or str as UTF-8) to p so that a reader sees either the old
  file or the whole new one, never a torn one: a uniquely named temporary beside it,
  then a rename (local), or one object upload (cloud storage, where an object appears
  whole). Creates the parent directories."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, str):
    data = data.encode("utf-8")
  if is_remote(p):
    p.write_bytes(data)
    return p
  tmp = unique_tmp(p)
  try:
    tmp.write_bytes(data)
    os.replace(tmp, p)
  finally:
    if tmp.exists():
      tmp.unlink()
  return p


def to_uint8(images) -> np.ndarray:
  """float [-1, 1] [..., H, W, C] → uint8 [0, 255] (round to nearest)."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
  """uint8 [0, 255] → float32 [-1, 1] (the inverse of `to_uint8` on its outputs)."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def grid(images: np.ndarray, rows: int, pad: int = 1) -> np.ndarray:
  """uint8 [N, H, W, C] → one uint8 image [rows·(H+pad)+pad, cols·(W+pad)+pad, C]
  filled row-major (image i at row i // cols)."""
  n, h, w, c = images.shape
  cols = -(-n // rows)
  out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  return out


def png_bytes(image: np.ndarray, upscale: int = 1) -> bytes:
  """uint8 [H, W, C] (C = 1 or 3) encoded as PNG, nearest-neighbour upscaled."""
  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  buf = _io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


def save_png(p: PathLike, image: np.ndarray, upscale: int = 1) -> str:
  """Writes uint8 [H, W, C] (C = 1 or 3) as PNG (atomically; local or cloud),
  nearest-neighbour upscaled; returns the path as a string."""
  return os.fspath(write_atomic(p, png_bytes(image, upscale)))


def grid_image(images, rows: int) -> np.ndarray:
  """float [-1, 1] [N, H, W, C] → the uint8 grid `save_grid` writes (small images
  upscaled to ≥ 64 pixels)."""
  images = to_uint8(images)
  upscale = max(1, 64 // images.shape[1])
  return grid(images, rows).repeat(upscale, axis=0).repeat(upscale, axis=1)


def save_grid(p: PathLike, images, rows: int) -> str:
  """float [-1, 1] [N, H, W, C] → PNG grid with `rows` rows; small images are upscaled."""
  return save_png(p, grid_image(images, rows))


def save_tensors(p: PathLike, tensors: dict, metadata: dict) -> str:
  """Writes numpy arrays {name: array} with string metadata as one .safetensors file
  (no pickle), atomically (local or cloud): a reader never sees a partial file."""
  from safetensors.numpy import save
  data = save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              metadata={str(k): str(v) for k, v in metadata.items()})
  return os.fspath(write_atomic(p, data))
