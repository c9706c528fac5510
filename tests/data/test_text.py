"""The byte-level tokenizer, digit captions, and text in the input pipeline."""
import re
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data
from diffusion_jax.config import base
from diffusion_jax.data import text


def _config(data_dir, **overrides):
  c = dict(name="sklearn_digits", data_dir=data_dir, split="train", batch_size=32,
           random_flip=False, image_size=0, num_threads=0, prefetch=0)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


TEXT = data.TextOptions(max_length=32)


def _names_digit(caption, label):
  words = re.findall(r"\w+", caption)
  return text.DIGIT_NAMES[label] in words or str(label) in words


def test_round_trip_and_layout():
  captions = ["a photo of the digit seven", "", "ünïcödé 7", "x" * 30]
  tokens = text.encode(captions, 32)
  assert tokens.shape == (4, 32) and tokens.dtype == np.int32
  assert text.decode(tokens) == captions
  assert np.all(tokens[:, 0] == text.BOS)
  np.testing.assert_array_equal(tokens[1, :3], [text.BOS, text.EOS, text.PAD])
  row = tokens[0]
  n = len(captions[0])
  np.testing.assert_array_equal(row[1:n + 1], np.frombuffer(captions[0].encode(), np.uint8) + 3)
  assert row[n + 1] == text.EOS and np.all(row[n + 2:] == text.PAD)
  np.testing.assert_array_equal(text.padding_mask(row), np.arange(32) < n + 2)
  assert tokens.max() < text.VOCAB_SIZE == 259
  assert text.encode([b"raw"], 8)[0, 1] == ord("r") + 3  # bytes: already encoded


def test_long_captions_are_cut_and_end_with_eos():
  tokens = text.encode(["abcdefghij", "abcdef", "abc"], 8)
  np.testing.assert_array_equal(tokens[0], [1, *(np.frombuffer(b"abcdef", np.uint8) + 3), 2])
  np.testing.assert_array_equal(tokens[1], tokens[0])  # exactly fits: same row
  assert text.decode(tokens) == ["abcdef", "abcdef", "abc"]
  np.testing.assert_array_equal(tokens[:, -1], [text.EOS, text.EOS, text.PAD])
  assert text.decode(text.encode(["é"], 3)) == ["\ufffd"]  # a cut inside a character
  with pytest.raises(ValueError, match="config.text.max_length"):
    text.encode(["a"], 1)


def test_digit_captions():
  captions = text.class_captions()
  assert len(captions) == 10 and all(len(c) == len(text.TEMPLATES) >= 6 for c in captions)
  for label, row in enumerate(captions):
    assert len(set(row)) == len(row)
    assert all(_names_digit(c, label) for c in row)
  longest = max(len(c.encode()) for row in captions for c in row)
  assert longest + 2 <= base().text.max_length  # the default never cuts a digit caption
  assert text.digit_caption(7, 1) == "a handwritten 7"


def test_text_options():
  """What text batches carry is the task's to ask (`Task.text`): a clip run and a
  text-conditional diffusion run do, an unconditional one does not."""
  from diffusion_jax.training import tasks
  c = base()
  assert data.text_options(c) == data.TextOptions(32, "caption", None)
  info = data.DatasetInfo((8, 8, 1), 10, 0)
  assert tasks.make(c, info).text is None
  c.task = "clip"
  assert tasks.make(c, info).text == data.TextOptions(32, "caption", None)
  c.task, c.text.encoder = "diffusion", "precomputed"
  assert data.text_options(c).embedding_feature == "text_embedding"


def test_batches_carry_captions_of_their_labels(data_dir):
  config = _config(data_dir)
  batches = [b for _, b in zip(range(3), data.make_train_iterator(config, seed=0, text=TEXT))]
  plain = next(data.make_train_iterator(config, seed=0))
  # Text adds a key; images and labels are those of the run without text.
  np.testing.assert_array_equal(batches[0]["image"], plain["image"])
  np.testing.assert_array_equal(batches[0]["label"], plain["label"])
  seen = set()
  for b in batches:
    assert b["tokens"].shape == (32, 32) and b["tokens"].dtype == np.int32
    for caption, label in zip(text.decode(b["tokens"]), b["label"]):
      assert _names_digit(caption, int(label)), (caption, label)
      seen.add(text.TEMPLATES.index(next(
          t for t in text.TEMPLATES
          if caption == t.format(name=text.DIGIT_NAMES[label], number=label))))
  assert len(seen) >= 6  # several templates in 96 captions
  # Deterministic per seed, different across seeds.
  again = next(data.make_train_iterator(config, seed=0, text=TEXT))
  np.testing.assert_array_equal(again["tokens"], batches[0]["tokens"])
  other = next(data.make_train_iterator(config, seed=1, text=TEXT))
  assert not np.array_equal(other["tokens"], batches[0]["tokens"])


def test_tokens_independent_of_process_count(data_dir):
  config = _config(data_dir, batch_size=16)
  single = next(data.make_train_iterator(config, seed=4, text=TEXT, process_index=0,
                                         process_count=1))
  halves = [next(data.make_train_iterator(config, seed=4, text=TEXT, process_index=p,
                                          process_count=2)) for p in range(2)]
  for k in ("image", "label", "tokens"):
    np.testing.assert_array_equal(single[k], np.concatenate([h[k] for h in halves]))


def test_held_out_arrays(data_dir):
  images, labels, tokens = data.load_text_arrays("sklearn_digits", "test", data_dir, text=TEXT)
  ref_images, ref_labels = data.load_arrays("sklearn_digits", "test", data_dir)
  np.testing.assert_array_equal(images, ref_images)
  np.testing.assert_array_equal(labels, ref_labels)
  assert tokens.shape == (296, 32)
  captions = text.decode(tokens)
  assert all(_names_digit(c, int(l)) for c, l in zip(captions, labels))
  assert len(set(captions)) > 40  # 10 classes × several templates
  _, _, again = data.load_text_arrays("sklearn_digits", "test", data_dir, text=TEXT)
  np.testing.assert_array_equal(again, tokens)


class _ToyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stand-in for a prepared captioned dataset: a string feature and an embedding."""

  name = "toy_captions"
  VERSION = tfds.core.Version("1.0.0")
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,
                                 features=tfds.features.FeaturesDict({
                                     "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
                                     "caption": tfds.features.Text(),
                                     "t5": tfds.features.Tensor(shape=(3, 5), dtype=np.float32)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(4):
      yield i, {"image": np.full((4, 4, 1), 10 * i, np.uint8),
                "caption": f"caption {i} ü", "t5": np.full((3, 5), i, np.float32)}


def test_tfds_string_feature_and_precomputed_embeddings(tmp_path, data_dir):
  _ToyCaptions(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  config = _config(str(tmp_path), name="toy_captions", batch_size=4)
  opts = data.TextOptions(max_length=16, feature="caption", embedding_feature="t5")
  batch = next(data.make_train_iterator(config, seed=0, text=opts))
  index = np.round((batch["image"][:, 0, 0, 0] + 1) * 127.5 / 10).astype(int)
  assert text.decode(batch["tokens"]) == [f"caption {i} ü" for i in index]
  assert batch["text_embedding"].dtype == np.float32
  np.testing.assert_array_equal(batch["text_embedding"][:, 0, 0], index)
  _, _, tokens = data.load_text_arrays("toy_captions", "train", tmp_path, text=opts)
  assert text.decode(tokens) == [f"caption {i} ü" for i in range(4)]
  with pytest.raises(ValueError, match="config.text.feature='title'.*toy_captions"):
    data.make_train_iterator(config, seed=0, text=data.TextOptions(16, feature="title"))
  with pytest.raises(ValueError, match="config.text.embedding_feature='text_embedding'"):
    data.make_train_iterator(_config(data_dir), seed=0,
                             text=data.TextOptions(16, embedding_feature="text_embedding"))
  assert "tensorflow" not in sys.modules


def test_placeholder_tokens():
  """<v0> … <v7> (and <v> = <v0>) are one token each, 259 + j, beyond the byte
  vocabulary; decode writes them back; cutting counts them as one token."""
  assert text.NUM_PLACEHOLDERS == 8 and text.VOCAB_SIZE == 259
  assert [text.placeholder(j) for j in (0, 7)] == ["<v0>", "<v7>"]
  with pytest.raises(ValueError, match="placeholder 8"):
    text.placeholder(8)
  row = text.encode(["a <v> b"], 16)[0]
  np.testing.assert_array_equal(
      row[:7], [text.BOS, ord("a") + 3, ord(" ") + 3, 259, ord(" ") + 3, ord("b") + 3, text.EOS])
  captions = ["a photo of <v3> and <v0>", "<v7>", "no placeholder", "<v8> <v 1> <V1>", "é<v5>"]
  tokens = text.encode(captions, 32)
  assert text.decode(tokens) == captions  # <v8>, <v 1>, <V1> are plain bytes
  assert text.decode(text.encode(["the <v> digit"], 32)) == ["the <v0> digit"]
  for j in range(8):
    ids = text.encode([f"x{text.placeholder(j)}y"], 8)[0]
    np.testing.assert_array_equal(ids[:5], [text.BOS, ord("x") + 3, 259 + j, ord("y") + 3,
                                            text.EOS])
  assert text.placeholder_ids(tokens) == [0, 3, 5, 7]
  assert text.placeholder_ids(text.encode(["plain"], 8)) == []
  assert text.encode([b"raw <v2>"], 16)[0, 5] == 261  # bytes (a Text feature) too
  # A cut keeps a placeholder whole or drops it, and still ends with EOS.
  cut = text.encode(["abcde<v1>fgh", "abcdef<v1>"], 8)
  np.testing.assert_array_equal(cut[0], [1, *(np.frombuffer(b"abcde", np.uint8) + 3), 260, 2])
  np.testing.assert_array_equal(cut[1], [1, *(np.frombuffer(b"abcdef", np.uint8) + 3), 2])
  assert text.decode(cut) == ["abcde<v1>", "abcdef"]


def test_templates():
  """config.text.templates replaces TEMPLATES for label captions; fields optional."""
  assert text.digit_caption(3, 0, ("a handwritten <v>",)) == "a handwritten <v>"
  assert text.digit_caption(3, 5, ("{number} is {name}", "x")) == "x"  # index wraps
  assert text.digit_caption(3, 0, ("{number} is {name}",)) == "3 is three"
  text.check_templates(("a <v>", "{name}", "{{literal}} {number}"))
  for bad, match in ((("{label}",), "field"), (("{",), "format string"), ("a <v>", "tuple"),
                     ((1,), "not a string")):
    with pytest.raises(ValueError, match=f"config.text.templates.*{match}"):
      text.check_templates(bad)
  c = base()
  c.text.templates = ("a handwritten <v>", "the digit <v>")
  assert data.text_options(c).templates == ("a handwritten <v>", "the digit <v>")
  c.text.templates = ("{label}",)
  with pytest.raises(ValueError, match="config.text.templates"):
    data.text_options(c)


def test_batches_use_the_configured_templates(data_dir):
  templates = ("a handwritten <v>", "the digit {number} <v1>")
  opts = data.TextOptions(max_length=32, templates=templates)
  config = _config(data_dir)
  batch = next(data.make_train_iterator(config, seed=0, text=opts))
  plain = next(data.make_train_iterator(config, seed=0, text=TEXT))
  np.testing.assert_array_equal(batch["image"], plain["image"])
  captions = text.decode(batch["tokens"])
  expected = [{"a handwritten <v0>", f"the digit {y} <v1>"} for y in batch["label"]]
  assert all(c in e for c, e in zip(captions, expected))
  assert len(set(c.split()[0] for c in captions)) == 2  # both templates drawn
  assert text.placeholder_ids(batch["tokens"]) == [0, 1]
  _, labels, tokens = data.load_text_arrays("sklearn_digits", "test", data_dir, text=opts)
  assert all(c in {"a handwritten <v0>", f"the digit {y} <v1>"}
             for c, y in zip(text.decode(tokens), labels))
