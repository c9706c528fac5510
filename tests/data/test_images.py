"""Few-image datasets (data/images.py, diffusion-jax-images): folders and .npz files
written as TFDS directories and read back through the training pipeline."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import data
from diffusion_jax.data import images as images_lib, text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT = data.TextOptions(max_length=32)


def _config(name, **overrides):
  c = dict(name=str(name), data_dir=None, split="train", batch_size=3, random_flip=False,
           image_size=0, num_threads=0, prefetch=0)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def _pixels(seed, shape=(6, 5, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _folder(path, pictures, captions=None, how="metadata", labels=None):
  """Writes PNGs img0.png, ... (and captions / labels as `how` says)."""
  os.makedirs(path)
  for i, p in enumerate(pictures):
    Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p).save(os.path.join(path, f"img{i}.png"))
  if how == "metadata":
    with open(os.path.join(path, "metadata.jsonl"), "w") as f:
      for i in range(len(pictures)):
        entry = {"file_name": f"img{i}.png"}
        if captions is not None:
          entry["text"] = captions[i]
        if labels is not None:
          entry["label"] = labels[i]
        f.write(json.dumps(entry) + "\n")
  elif how == "txt":
    for i, c in enumerate(captions):
      with open(os.path.join(path, f"img{i}.txt"), "w") as f:
        f.write(c + "\n")
  return path


def _read_back(path, n, text_options=TEXT):
  """One training batch of all n examples, in stored order (sorted by a pixel key)."""
  batch = next(data.make_train_iterator(_config(path, batch_size=n), seed=0, text=text_options))
  return batch


@pytest.mark.parametrize("how", ["metadata", "txt"])
def test_folder_with_captions(tmp_path, how):
  pictures = [_pixels(i) for i in range(3)]
  captions = ["a photo of <v>", "a <v> on the beach", "ünïcödé <v1>"]
  folder = _folder(str(tmp_path / "pics"), pictures, captions, how,
                   labels=[2, 0, 1] if how == "metadata" else None)
  out = tmp_path / "ds"
  info = images_lib.write(folder, out)
  labelled = how == "metadata"
  assert info == data.DatasetInfo((6, 5, 3), 3 if labelled else 0, 3)
  batch = _read_back(str(out), 3)
  # Each row is one of the pictures, with its own caption (and label).
  want = {bytes(p): (c, y) for p, c, y in zip(pictures, captions, [2, 0, 1])}
  seen = set()
  for x, tokens, label in zip(batch["image"], batch["tokens"], batch["label"]):
    raw = np.round((x + 1) * 127.5).astype(np.uint8)
    caption, y = want[bytes(raw)]
    assert text.decode(tokens[None])[0] == caption.replace("<v>", "<v0>")
    assert label == (y if labelled else 0)
    seen.add(caption)
  assert len(seen) == 3
  # Stored order is the files' sorted order.
  arrays, labels = data.load_arrays(str(out), "train")
  np.testing.assert_array_equal(np.round((arrays + 1) * 127.5).astype(np.uint8), pictures)
  _, _, tokens = data.load_text_arrays(str(out), "train", text=TEXT)
  assert text.decode(tokens) == [c.replace("<v>", "<v0>") for c in captions]
  assert "tensorflow" not in sys.modules


def test_folder_sizes_modes_and_resize(tmp_path):
  """Grayscale files give 1 channel; different sizes are an error naming the file,
  unless image_size center-crops and resizes (bicubic, as config.data.image_size)."""
  pictures = [_pixels(0, (10, 8, 1)), _pixels(1, (8, 12, 1)), _pixels(2, (8, 8, 1))]
  folder = _folder(str(tmp_path / "gray"), pictures, how=None)
  with pytest.raises(ValueError, match=r"img1.png is 12×8.*img0.png is 8×10.*image_size"):
    images_lib.write(folder, tmp_path / "bad")
  assert not (tmp_path / "bad" / "dataset_info.json").exists()
  info = images_lib.write(folder, tmp_path / "ds", caption="a gray square", image_size=4)
  assert info.image_shape == (4, 4, 1) and info.num_examples == 3
  arrays, _ = data.load_arrays(str(tmp_path / "ds"), "train")
  for p, got in zip(pictures, arrays):
    h, w = p.shape[:2]
    s = min(h, w)
    crop = p[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, 0]
    want = np.asarray(Image.fromarray(crop).resize((4, 4), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(np.round((got[..., 0] + 1) * 127.5).astype(np.uint8), want)
  _, _, tokens = data.load_text_arrays(str(tmp_path / "ds"), "train", text=TEXT)
  assert text.decode(tokens) == ["a gray square"] * 3
  # A mix of grayscale and colour files: all RGB.
  mixed = _folder(str(tmp_path / "mixed"), [_pixels(3, (4, 4, 1)), _pixels(4, (4, 4, 3))],
                  how=None)
  assert images_lib.write(mixed, tmp_path / "rgb").image_shape == (4, 4, 3)


def test_npz_from_diffusion_jax_sample(tmp_path):
  """The .npz diffusion-jax-sample writes (images uint8, labels int32, -1 for an
  unconditional model, values float32) is accepted as it is."""
  rng = np.random.default_rng(0)
  values = rng.uniform(-1, 1, (5, 8, 8, 1)).astype(np.float32)
  uint8 = np.clip(np.round((values + 1) * 127.5), 0, 255).astype(np.uint8)  # io.to_uint8
  npz = tmp_path / "class.npz"
  np.savez(npz, images=uint8, labels=np.full(5, -1, np.int32), values=values)
  info = images_lib.write(npz, tmp_path / "class", caption="a digit")
  assert info == data.DatasetInfo((8, 8, 1), 0, 5)
  x, y = data.load_arrays(str(tmp_path / "class"), "train")
  np.testing.assert_array_equal(x, uint8.astype(np.float32) / 127.5 - 1)
  assert not y.any()
  batch = _read_back(str(tmp_path / "class"), 5)
  assert text.decode(batch["tokens"]) == ["a digit"] * 5
  # A class-conditional model's samples keep their labels; float images in [-1, 1] and
  # captions of their own work too.
  npz = tmp_path / "labelled.npz"
  np.savez(npz, images=values, labels=np.array([9, 9, 3, 9, 9], np.int32),
           captions=np.array(["nine", "nine", "three", "nine", "nine"]))
  info = images_lib.write(npz, tmp_path / "labelled", num_classes=10)
  assert info.num_classes == 10
  x, y = data.load_arrays(str(tmp_path / "labelled"), "train")
  np.testing.assert_array_equal(x, uint8.astype(np.float32) / 127.5 - 1)
  np.testing.assert_array_equal(y, [9, 9, 3, 9, 9])
  _, _, tokens = data.load_text_arrays(str(tmp_path / "labelled"), "train", text=TEXT)
  assert text.decode(tokens) == ["nine", "nine", "three", "nine", "nine"]
  # The label filter works on it like on any labelled dataset.
  _, y = data.load_arrays(str(tmp_path / "labelled"), "train", labels=(3,))
  np.testing.assert_array_equal(y, [3])


def test_errors_name_the_file_or_key(tmp_path):
  def fails(match, inp, out="out", **kw):
    with pytest.raises(ValueError, match=match):
      images_lib.write(inp, tmp_path / out, **kw)

  fails("no such folder", tmp_path / "missing")
  os.makedirs(tmp_path / "empty")
  fails("holds no images", tmp_path / "empty")
  npz = tmp_path / "x.npz"
  np.savez(npz, pictures=np.zeros((2, 4, 4, 1), np.uint8))
  fails("x.npz.* no array 'images'", npz)
  np.savez(npz, images=np.zeros((2, 4, 4, 2), np.uint8))
  fails(r"'images' must be \[N, H, W, C\].*\(2, 4, 4, 2\)", npz)
  np.savez(npz, images=np.full((2, 4, 4, 1), 1.5, np.float32))
  fails(r"float 'images' must be in \[-1, 1\]", npz)
  np.savez(npz, images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([3, -1]))
  fails("mixes classes with -1", npz)
  np.savez(npz, images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([3, 4]))
  fails(r"num_classes=4: .*image 1.* labels \[4\]", npz, num_classes=4)
  np.savez(npz, images=np.zeros((2, 4, 4, 1), np.uint8), captions=np.array(["a", "b"]))
  fails("caption='c', but .* has captions of its own", npz, caption="c")
  np.savez(npz, images=np.zeros((2, 4, 4, 1), np.uint8))
  fails("num_classes=3, but .* has no labels", npz, num_classes=3)
  # Folders: metadata that does not match the files, captions for some files only.
  pics = [_pixels(i, (4, 4, 3)) for i in range(2)]
  folder = _folder(str(tmp_path / "a"), pics, ["x", "y"], "metadata")
  with open(os.path.join(folder, "metadata.jsonl"), "a") as f:
    f.write('{"file_name": "img7.png", "text": "z"}\n')
  fails(r"metadata.jsonl lists \['img7.png'\]", folder)
  folder = _folder(str(tmp_path / "b"), pics, how=None)
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    f.write('{"file_name": "img0.png", "text": "x"}\n{"file_name": "img1.png"}\n')
  fails(r"\['img1.png'\] have no \"text\"", folder)
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    f.write('{"file_name": "img0.png", "label": "cat"}\n')
  fails(r"metadata.jsonl, line 1: \"label\" must be an integer", folder)
  folder = _folder(str(tmp_path / "c"), pics, how=None)
  with open(os.path.join(folder, "img0.txt"), "w") as f:
    f.write("only one\n")
  fails(r"\['img1.png'\] have no <stem>.txt caption", folder)
  with open(os.path.join(folder, "img1.png"), "wb") as f:
    f.write(b"not a png")
  fails("img1.png: not a readable image", folder)
  os.makedirs(tmp_path / "full")
  open(tmp_path / "full" / "keep", "w").close()
  np.savez(npz, images=np.zeros((2, 4, 4, 1), np.uint8))
  fails("output_dir=.*full exists and is not an empty directory", npz, out="full")


def test_command_line(tmp_path):
  """diffusion-jax-images (launch/images.py) writes the dataset; an error is one line
  and exit status 1."""
  npz = tmp_path / "samples.npz"
  np.savez(npz, images=np.zeros((3, 8, 8, 1), np.uint8), labels=np.full(3, -1, np.int32))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  script = os.path.join(ROOT, "launch", "images.py")
  out = tmp_path / "ds"
  proc = subprocess.run([sys.executable, script, f"--input={npz}", f"--output={out}",
                         "--caption=a digit"], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert f"Wrote 3 images (8, 8, 1) to {out}" in proc.stdout
  _, _, tokens = data.load_text_arrays(str(out), "train", text=TEXT)
  assert text.decode(tokens) == ["a digit"] * 3
  proc = subprocess.run([sys.executable, script, f"--input={npz}", f"--output={out}"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and "error: output_dir=" in proc.stderr
