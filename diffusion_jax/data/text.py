"""Text for the CLIP task and text conditioning: a byte-level tokenizer that needs no
download, and captions made from the labels of the embedded digit datasets.

Tokens (vocabulary of 259):

    0 = PAD,  1 = BOS,  2 = EOS,  byte b ↦ b + 3   (UTF-8 bytes, b ∈ 0..255)

A caption becomes [BOS, b₁+3, …, bₙ+3, EOS, PAD, …] of exactly `max_length` tokens; a
caption that does not fit is cut and still ends with EOS, so the text transformer can
always pool at the EOS position (the last non-pad token).

Captions of `sklearn_digits` / `mnist5k` examples come from their labels through one of
`TEMPLATES`, e.g. "a photo of the digit seven" or "a handwritten 7". The training
pipeline draws the template from the element's own random generator (seeded by the
seed and the element's position in the stream), so a fixed seed gives the same
captions, on any number of processes.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET  # 259

# The embedded digit datasets: label d is the digit d.
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {name}: the word ("seven"), {number}: the numeral ("7"). Both forms, so that the text
# encoder has to learn that "seven" and "7" mean the same class. The longest caption
# ("a scan of a handwritten seven", 29 bytes + BOS + EOS) fits the default
# config.text.max_length = 32.
TEMPLATES = (
    "a photo of the digit {name}",
    "a handwritten {number}",
    "the number {name}",
    "a drawing of the digit {number}",
    "an image of a {name}",
    "{name}",
    "the digit {number}",
    "a scan of a handwritten {name}",
)


def encode(strings: Iterable[str | bytes], max_length: int) -> np.ndarray:
  """Byte-level tokens of N strings: int32 [N, max_length].

  Each row is BOS, the UTF-8 bytes + 3, EOS, then PAD (0). A string longer than
  max_length − 2 bytes is cut to its first max_length − 2 bytes; the row still ends with
  EOS. `bytes` are taken as already encoded.
  """
  if max_length < 2:
    raise ValueError(f"config.text.max_length={max_length} must be >= 2 (BOS and EOS)")
  rows = []
  for s in strings:
    raw = s if isinstance(s, bytes) else str(s).encode("utf-8")
    body = np.frombuffer(raw[:max_length - 2], np.uint8).astype(np.int32) + BYTE_OFFSET
    row = np.zeros(max_length, np.int32)
    row[0] = BOS
    row[1:1 + len(body)] = body
    row[1 + len(body)] = EOS
    rows.append(row)
  return np.stack(rows) if rows else np.zeros((0, max_length), np.int32)


def decode(tokens) -> list[str]:
  """Inverse of `encode` for tokens [N, L] (or one row [L]): the bytes between BOS and
  the first EOS/PAD, as UTF-8 (a multi-byte character split by a cut becomes U+FFFD)."""
  tokens = np.asarray(tokens)
  if tokens.ndim == 1:
    tokens = tokens[None]
  out = []
  for row in tokens:
    row = row[1:] if len(row) and row[0] == BOS else row
    stop = np.flatnonzero((row == EOS) | (row == PAD))
    row = row[:stop[0]] if len(stop) else row
    out.append(bytes((row - BYTE_OFFSET).astype(np.uint8).tolist()).decode("utf-8", "replace"))
  return out


def padding_mask(tokens):
  """tokens [..., L] → bool [..., L], True at real tokens (BOS, bytes, EOS), False at PAD.
  Works on numpy and jax arrays."""
  return tokens != PAD


def digit_caption(label: int, template: int) -> str:
  """The caption of digit `label` (0..9) with TEMPLATES[template]."""
  if not 0 <= int(label) < len(DIGIT_NAMES):
    raise ValueError(f"digit caption: label {label} not in 0..9")
  return TEMPLATES[int(template) % len(TEMPLATES)].format(
      name=DIGIT_NAMES[int(label)], number=str(int(label)))


def choose_template(rng: np.random.Generator) -> int:
  """A template index drawn from an element's generator (the pipeline's per-element
  randomness), so captions are a function of (seed, stream position)."""
  return int(rng.integers(len(TEMPLATES)))


def digit_captions(labels: Sequence[int], templates: Sequence[int]) -> list[str]:
  """Captions of N digits [N] with template indices [N]."""
  return [digit_caption(l, t) for l, t in zip(labels, templates)]


def class_captions(num_classes: int = 10) -> list[list[str]]:
  """Every template for every class: [num_classes][len(TEMPLATES)] strings (zero-shot
  classification prompts)."""
  return [[digit_caption(c, t) for t in range(len(TEMPLATES))] for c in range(num_classes)]
