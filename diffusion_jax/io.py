"""Images at the edges: [-1, 1] floats ↔ uint8, grids, PNG files; small tensor files (.safetensors)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


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


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> str:
  """Writes uint8 [H, W, C] (C = 1 or 3) as PNG, nearest-neighbour upscaled; returns path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if upscale > 1:
    image = image.repeat(upscale, axis=0).repeat(upscale, axis=1)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
  return path


def save_grid(path: str, images, rows: int) -> str:
  """float [-1, 1] [N, H, W, C] → PNG grid with `rows` rows; small images are upscaled."""
  images = to_uint8(images)
  return save_png(path, grid(images, rows), upscale=max(1, 64 // images.shape[1]))


def save_tensors(path: str, tensors: dict, metadata: dict) -> str:
  """Writes numpy arrays {name: array} with string metadata as one .safetensors file
  (no pickle), atomically: a reader never sees a partial file."""
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
            metadata={str(k): str(v) for k, v in metadata.items()})
  os.replace(tmp, path)
  return path
