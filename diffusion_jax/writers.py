"""A run's metrics: `metrics.jsonl` (one JSON object per step) and TensorBoard event
files (scalars and images), in a local or cloud workdir (`io.path`).

Each step appears once. A writer reads the existing metrics.jsonl and rewrites it
clean: without a torn line (a write cut short by a crash), with one row per step (a
step written again replaces its row) and, for a run resumed from the checkpoint at
`start_step`, without the rows after it (the crashed run wrote them after that
checkpoint; the resumed run writes those steps again). TensorBoard hides the events
after the same step: every writer with a start_step begins its event file with a
`SessionLog.START` at start_step + 1 (tensorboardX's `purge_step`), and TensorBoard
drops the events of earlier files from that step on. `read_metrics` is the reader.

Event files are TFRecord-framed `Event` protocol buffers, as tensorboardX (no
TensorFlow) writes them, but written synchronously, so a flush has everything on disk:
tensorboardX's SummaryWriter writes from a background thread (its `flush` does not wait
for queued events) and fails on `gs://` (`'GCSRecordWriter' object has no attribute
'buffer'`).

Cloud storage (`gs://…`) cannot append to an object, so there every `write` uploads
metrics.jsonl whole (~150 bytes a row: ~1.5 MB after 10⁴ logged steps) and the current
event file whole; an event file is closed and a new one begun once it passes 1 MiB
(`_SEGMENT_BYTES`), which bounds each upload. Locally both are appended and flushed.

Only process 0 writes; the other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
import socket
import struct
import time
import uuid

import jax
import numpy as np
from absl import logging

from diffusion_jax import io

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
_SEGMENT_BYTES = 1 << 20


def read_metrics(p: io.PathLike) -> list[dict]:
  """The rows of a metrics.jsonl in file order; p is the file (`*.jsonl`) or the
  directory holding it (a workdir, `<workdir>/eval`). A torn last line (a write cut
  short by a crash: the file's last line, without its newline, unreadable) is skipped;
  any other unreadable line is an error naming the file and the line."""
  p = io.path(p)
  if p.suffix != ".jsonl":
    p = p / METRICS
  rows, bad, torn = _parse(p.read_text())
  if bad[:-1] if torn else bad:
    raise ValueError(f"{p}: line {bad[0]} is not a metrics row (a JSON object with an "
                     "integer 'step')")
  return rows


def _parse(text: str):
  """(rows, the line numbers (from 1) of unreadable lines, whether the last of them is a
  torn end: the text's last line, not ended by a newline)."""
  lines = text.split("\n")
  rows, bad = [], []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError("not a metrics row")
    except ValueError:
      bad.append(i)
      continue
    rows.append(row)
  return rows, bad, bool(bad) and bad[-1] == len(lines)


def _text(lines: dict) -> str:
  """The file of {step: its JSON line}: one line per step, in step order."""
  return "".join(lines[s] + "\n" for s in sorted(lines))


class MetricWriter:
  """Scalars (and images) of a run or an evaluation by step, into `<workdir>/metrics.jsonl`
  and `<workdir>/tensorboard/`.

  start_step: the step of the checkpoint a run resumes from (0 for a fresh run): the
  rows after it are dropped and TensorBoard hides the events after it. None (an
  evaluation's writer, adding its step to the results of earlier ones): every row
  kept. Either way a torn line goes, a step written again replaces its row, and the
  rows are kept in step order.
  """

  def __init__(self, workdir: io.PathLike, *, start_step: int | None = None):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    directory = io.path(workdir)
    self._remote = io.is_remote(workdir)
    self._path = directory / METRICS
    self._lines = self._load(start_step)  # {step: its row as a JSON line}
    self._append = None if self._remote else self._path.open("a")
    self._events = _EventFiles(directory / TENSORBOARD, self._remote,
                               purge_step=None if start_step is None else start_step + 1)

  def _load(self, start_step) -> dict:
    """The existing rows to keep, {step: JSON line}; rewrites the file when that changes
    it."""
    if not self._path.exists():
      self._path.parent.mkdir(parents=True, exist_ok=True)
      return {}
    text = self._path.read_text()
    rows, bad, _ = _parse(text)
    kept = {r["step"]: json.dumps(r) for r in rows
            if start_step is None or r["step"] <= start_step}
    clean = _text(kept)
    if clean != text:
      later = 0 if start_step is None else sum(r["step"] > start_step for r in rows)
      dropped = {f"rows after step {start_step} (the resumed run writes them again)": later,
                 "repeated steps": len(rows) - later - len(kept), "unreadable lines": len(bad)}
      what = ", ".join(f"{n} {what}" for what, n in dropped.items() if n)
      logging.info("Rewrote %s %s", self._path, f"without {what}" if what else "in step order")
      io.write_atomic(self._path, clean)
    return kept

  def write(self, step: int, metrics: dict) -> None:
    """One row {"step": step, name: float(value), ...} and the same TensorBoard scalars."""
    if not self.active:
      return
    step = int(step)
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    for k, v in row.items():
      if k != "step":
        self._events.add(step, tag=k, simple_value=v)
    in_order = not self._lines or step > max(self._lines)
    self._lines[step] = json.dumps(row)
    if self._append is not None and in_order:
      self._append.write(self._lines[step] + "\n")
      self._append.flush()
    else:  # cloud storage, or a step at or before the last: the whole file again
      if self._append is not None:
        self._append.close()
      io.write_atomic(self._path, _text(self._lines))
      if self._append is not None:
        self._append = self._path.open("a")
    self._events.flush()

  def write_images(self, step: int, name: str, image: np.ndarray) -> None:
    """A TensorBoard image (e.g. a sample grid, `io.grid_image`): uint8 [H, W, C] with
    C = 1 (grey), 3 (RGB) or 4 (RGBA), stored as PNG."""
    if not self.active:
      return
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
      raise ValueError(f"write_images({name!r}): expected uint8 [H, W, C] with C in (1, 3, 4), "
                       f"got {image.dtype} {image.shape}")
    h, w, c = image.shape
    self._events.add(int(step), tag=name, image=dict(
        height=h, width=w, colorspace=c, encoded_image_string=io.png_bytes(image)))
    self._events.flush()

  def close(self) -> None:
    if self.active:
      self._events.close()
      if self._append is not None:
        self._append.close()
      self.active = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _protos():
  """tensorboardX's Event and Summary protocol buffers and its TFRecord checksum,
  imported on first use (only process 0 writes; tensorboardX imports PyTorch where
  it is installed, seconds)."""
  from tensorboardX.proto import event_pb2, summary_pb2
  from tensorboardX.record_writer import masked_crc32c
  return event_pb2, summary_pb2, masked_crc32c


class _EventFiles:
  """TensorBoard event files in a directory: TFRecords (length, its masked CRC-32C, data,
  its masked CRC-32C) of `Event` protos, the first one's file_version "brain.Event:2".
  Appended locally; on cloud storage the current file is uploaded whole at each flush,
  and a new one begun after `_SEGMENT_BYTES`. Names `events.out.tfevents.<time in µs>.
  <host>.<id>.<segment>` sort in writing order, the order TensorBoard reads them in."""

  def __init__(self, directory, remote: bool, purge_step: int | None):
    self._event_pb2, self._summary_pb2, self._crc = _protos()
    self._dir, self._remote = directory, remote
    self._id, self._segment, self._file = uuid.uuid4().hex[:8], 0, None
    self._dir.mkdir(parents=True, exist_ok=True)
    self._begin()
    if purge_step is not None:  # TensorBoard drops earlier files' events from this step
      self._write(self._event_pb2.Event(wall_time=time.time(), step=purge_step,
                                        session_log=self._event_pb2.SessionLog(
                                            status=self._event_pb2.SessionLog.START)))

  def _begin(self):
    name = (f"events.out.tfevents.{time.time():017.6f}.{socket.gethostname()}."
            f"{self._id}.{self._segment:04d}")
    self._name, self._buffer, self._unsaved = self._dir / name, bytearray(), True
    if not self._remote:
      self._file = self._name.open("ab")
    self._write(self._event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event):
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    record = (header + struct.pack("<I", self._crc(header)) + data
              + struct.pack("<I", self._crc(data)))
    if self._remote:
      self._buffer += record
      self._unsaved = True
    else:
      self._file.write(record)

  def add(self, step: int, **value) -> None:
    """One `Summary.Value(**value)` at step (tag and simple_value, or tag and image)."""
    summary = self._summary_pb2.Summary(value=[self._summary_pb2.Summary.Value(**value)])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
      return
    if self._unsaved:
      io.write_atomic(self._name, bytes(self._buffer))
      self._unsaved = False
    if len(self._buffer) > _SEGMENT_BYTES:
      self._segment += 1
      self._begin()

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
