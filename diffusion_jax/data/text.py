"""Text for the CLIP task and text conditioning: a byte-level tokenizer that needs no
download, and captions made from the labels of the embedded digit datasets.

Tokens (the byte vocabulary of 259, and 8 reserved placeholder ids after it):

    0 = PAD,  1 = BOS,  2 = EOS,  byte b ↦ b + 3   (UTF-8 bytes, b ∈ 0..255)
    placeholder <vj> ↦ 259 + j                      (j ∈ 0..7; "<v>" is "<v0>")

A caption becomes [BOS, t₁, …, tₙ, EOS, PAD, …] of exactly `max_length` tokens, tᵢ its
bytes + 3 except that each placeholder substring `<v0>` … `<v7>` (or `<v>`) is one token
259 + j. A caption that does not fit is cut and still ends with EOS, so the text
transformer can always pool at the EOS position (the last non-pad token).

Placeholders are the new words of personalisation: textual inversion (Gal et al. 2022)
learns the embedding of a pseudo-word S* alone, with the text transformer frozen; the
embedding table of the byte vocabulary (`VOCAB_SIZE` rows) knows none of them, so a
model that reads them brings their embeddings (config.finetune.placeholders).

Captions of `sklearn_digits` / `mnist5k` examples come from their labels through one of
`TEMPLATES` (or config.text.templates), e.g. "a photo of the digit seven" or "a
handwritten 7". The training pipeline draws the template from the element's own random
generator (seeded by the seed and the element's position in the stream), so a fixed
seed gives the same captions, on any number of processes.
"""
from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET  # 259: the byte vocabulary a text transformer embeds
NUM_PLACEHOLDERS = 8  # reserved ids VOCAB_SIZE + j, written <vj> (j < NUM_PLACEHOLDERS)

# `<v>` (= `<v0>`) or `<v0>` … `<v7>`, in UTF-8 bytes (encode works on bytes).
_PLACEHOLDER = re.compile(rb"<v([0-%d])?>" % (NUM_PLACEHOLDERS - 1))

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
# The format fields a template may use (each optional: "a photo of <v>" has none).
TEMPLATE_FIELDS = ("name", "number")


def placeholder(j: int) -> str:
  """The prompt text of placeholder j: "<vj>" (token VOCAB_SIZE + j)."""
  if not 0 <= int(j) < NUM_PLACEHOLDERS:
    raise ValueError(f"placeholder {j} not in 0..{NUM_PLACEHOLDERS - 1} (the tokenizer "
                     f"reserves {NUM_PLACEHOLDERS})")
  return f"<v{int(j)}>"


def _tokens_of(raw: bytes) -> np.ndarray:
  """int32 [n]: the bytes + 3, each placeholder substring one token VOCAB_SIZE + j."""
  parts, start = [], 0
  for m in _PLACEHOLDER.finditer(raw):
    parts.append(np.frombuffer(raw[start:m.start()], np.uint8).astype(np.int32) + BYTE_OFFSET)
    parts.append(np.array([VOCAB_SIZE + int(m.group(1) or 0)], np.int32))
    start = m.end()
  parts.append(np.frombuffer(raw[start:], np.uint8).astype(np.int32) + BYTE_OFFSET)
  return np.concatenate(parts)


def encode(strings: Iterable[str | bytes], max_length: int) -> np.ndarray:
  """Byte-level tokens of N strings: int32 [N, max_length].

  Each row is BOS, the UTF-8 bytes + 3 (each `<vj>` / `<v>` one placeholder token
  VOCAB_SIZE + j), EOS, then PAD (0). A string of more than max_length − 2 tokens is
  cut to its first max_length − 2; the row still ends with EOS. `bytes` are taken as
  already UTF-8 encoded (a dataset's Text feature), placeholders included.
  """
  if max_length < 2:
    raise ValueError(f"config.text.max_length={max_length} must be >= 2 (BOS and EOS)")
  rows = []
  for s in strings:
    raw = s if isinstance(s, bytes) else str(s).encode("utf-8")
    body = _tokens_of(raw)[:max_length - 2]
    row = np.zeros(max_length, np.int32)
    row[0] = BOS
    row[1:1 + len(body)] = body
    row[1 + len(body)] = EOS
    rows.append(row)
  return np.stack(rows) if rows else np.zeros((0, max_length), np.int32)


def decode(tokens) -> list[str]:
  """Inverse of `encode` for tokens [N, L] (or one row [L]): the tokens between BOS and
  the first EOS/PAD as UTF-8, placeholders written back as "<vj>" (so "<v>" comes back
  as "<v0>"; a multi-byte character split by a cut becomes U+FFFD)."""
  tokens = np.asarray(tokens)
  if tokens.ndim == 1:
    tokens = tokens[None]
  out = []
  for row in tokens:
    row = row[1:] if len(row) and row[0] == BOS else row
    stop = np.flatnonzero((row == EOS) | (row == PAD))
    row = row[:stop[0]] if len(stop) else row
    raw = b"".join(b"<v%d>" % (t - VOCAB_SIZE)
                   if VOCAB_SIZE <= t < VOCAB_SIZE + NUM_PLACEHOLDERS
                   else bytes([(t - BYTE_OFFSET) % 256]) for t in row.tolist())
    out.append(raw.decode("utf-8", "replace"))
  return out


def placeholder_ids(tokens) -> list[int]:
  """The placeholders j used anywhere in tokens [...] (sorted, each once)."""
  tokens = np.asarray(tokens)
  used = tokens[(tokens >= VOCAB_SIZE) & (tokens < VOCAB_SIZE + NUM_PLACEHOLDERS)]
  return sorted(int(t) - VOCAB_SIZE for t in np.unique(used))


def padding_mask(tokens):
  """tokens [..., L] → bool [..., L], True at real tokens (BOS, bytes, EOS), False at PAD.
  Works on numpy and jax arrays."""
  return tokens != PAD


def check_templates(templates: Sequence[str], key: str = "config.text.templates") -> None:
  """Raises unless every template is a str whose format fields are among
  TEMPLATE_FIELDS ({name}, {number}; none is fine)."""
  if isinstance(templates, str):
    raise ValueError(f"{key}={templates!r} must be a tuple of strings, not one string")
  for t in templates:
    if not isinstance(t, str):
      raise ValueError(f"{key}: {t!r} is not a string")
    try:
      fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
    except ValueError as e:
      raise ValueError(f"{key}: template {t!r} is not a format string ({e}); write a "
                       "literal brace as {{ or }}") from None
    bad = sorted(fields - set(TEMPLATE_FIELDS))
    if bad:
      raise ValueError(f"{key}: template {t!r} uses the field(s) {bad}; a template may "
                       f"use {{name}} and {{number}} only")


def digit_caption(label: int, template: int, templates: Sequence[str] | None = None) -> str:
  """The caption of digit `label` (0..9) with templates[template] (default TEMPLATES;
  an index past the end wraps around)."""
  if not 0 <= int(label) < len(DIGIT_NAMES):
    raise ValueError(f"digit caption: label {label} not in 0..9")
  templates = templates or TEMPLATES
  return templates[int(template) % len(templates)].format(
      name=DIGIT_NAMES[int(label)], number=str(int(label)))


def choose_template(rng: np.random.Generator, templates: Sequence[str] | None = None) -> int:
  """A template index into `templates` (default TEMPLATES) drawn from an element's
  generator (the pipeline's per-element randomness), so captions are a function of
  (seed, stream position)."""
  return int(rng.integers(len(templates or TEMPLATES)))


def digit_captions(labels: Sequence[int], templates: Sequence[int],
                   texts: Sequence[str] | None = None) -> list[str]:
  """Captions of N digits [N] with template indices [N] into `texts` (default
  TEMPLATES)."""
  return [digit_caption(l, t, texts) for l, t in zip(labels, templates)]


def class_captions(num_classes: int = 10) -> list[list[str]]:
  """Every template for every class: [num_classes][len(TEMPLATES)] strings (zero-shot
  classification prompts)."""
  return [[digit_caption(c, t) for t in range(len(TEMPLATES))] for c in range(num_classes)]
