"""MetricWriter and read_metrics: each step once after a crash and resume, a torn last
line tolerated, TensorBoard scalars and images (read back with a TFRecord parser of
this file's own and tensorboardX's protos), and the same on a gs:// workdir against a
GCS-protocol server on loopback (tests/gcs_emulator.py)."""
import io as _io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import io, writers
from gcs_emulator import gcs_fixture

gcs_server = gcs_fixture()


def _masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC-32C (tensorflow/core/lib/hash/crc32c.h)."""
  from tensorboardX.crc32c import crc32c
  c = crc32c(data) & 0xFFFFFFFF
  return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(directory) -> list:
  """Every Event of the event files in directory, files in name order (as TensorBoard
  reads them), checksums checked."""
  from tensorboardX.proto import event_pb2
  directory = io.path(directory)
  events = []
  for f in sorted(directory.iterdir(), key=lambda p: p.name):
    assert "tfevents" in f.name
    data, pos = f.read_bytes(), 0
    while pos < len(data):
      header = data[pos:pos + 8]
      (n,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked_crc(header)
      body = data[pos + 12:pos + 12 + n]
      assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == _masked_crc(body)
      events.append(event_pb2.Event.FromString(body))
      pos += 16 + n
    assert events[-1] is not None
  return events


def scalars(events) -> dict:
  """{tag: [(step, value), ...]} in file order."""
  out = {}
  for e in events:
    for v in e.summary.value:
      if v.HasField("simple_value"):
        out.setdefault(v.tag, []).append((e.step, v.simple_value))
  return out


def test_resume_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
  """A run logs steps 2..8, crashes in the middle of writing step 10's row, resumes from
  its checkpoint at step 4 and logs 6..10 again: every step once, the resumed values."""
  w = writers.MetricWriter(tmp_path, start_step=0)
  for step in (2, 4, 6, 8):
    w.write(step, {"loss": step})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 10, "lo')  # killed here: no close, a torn last line
  w = writers.MetricWriter(tmp_path, start_step=4)
  assert [r["step"] for r in writers.read_metrics(tmp_path)] == [2, 4]
  for step in (6, 8, 10):
    w.write(step, {"loss": -step})
  w.close()
  rows = writers.read_metrics(tmp_path)
  assert [(r["step"], r["loss"]) for r in rows] == [(2, 2), (4, 4), (6, -6), (8, -8), (10, -10)]
  assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")


def test_a_step_written_again_replaces_its_row(tmp_path):
  """An evaluation's writer (no start_step) keeps the earlier evaluations' rows; the
  same step evaluated again replaces its row; rows stay in step order."""
  with writers.MetricWriter(tmp_path) as w:
    w.write(500, {"fd": 3.0})
    w.write(1000, {"fd": 2.0})
  with writers.MetricWriter(tmp_path) as w:
    w.write(500, {"fd": 1.5, "kid": 0.1})
    w.write(250, {"fd": 9.0})
  rows = writers.read_metrics(tmp_path / "metrics.jsonl")
  assert rows == [{"step": 250, "fd": 9.0}, {"step": 500, "fd": 1.5, "kid": 0.1},
                  {"step": 1000, "fd": 2.0}]


def test_read_metrics_skips_a_torn_last_line_only(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "loss": 0.1')
  assert [r["step"] for r in writers.read_metrics(tmp_path)] == [1, 2]
  p.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.1}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 "):
    writers.read_metrics(p)
  # A writer, though, cleans such a file (an old run's appends after a crash) on resume.
  writers.MetricWriter(tmp_path, start_step=3).close()
  assert [r["step"] for r in writers.read_metrics(p)] == [1, 3]


def test_tensorboard_scalars_images_and_purge_on_resume(tmp_path):
  w = writers.MetricWriter(tmp_path, start_step=0)
  w.write(2, {"loss": 0.5, "lr": 1e-3})
  grid = np.random.default_rng(0).integers(0, 256, (9, 13, 3), dtype=np.uint8)
  w.write_images(2, "samples", grid)
  grey = np.arange(20, dtype=np.uint8).reshape(4, 5, 1)
  w.write_images(2, "grey", grey)
  # Read back while the writer is open: each write is flushed.
  events = read_events(tmp_path / "tensorboard")
  assert events[0].file_version == "brain.Event:2"
  assert scalars(events) == {"loss": [(2, 0.5)], "lr": [(2, pytest.approx(1e-3))]}
  images = {v.tag: (e.step, v.image) for e in events for v in e.summary.value
            if v.HasField("image")}
  step, img = images["samples"]
  assert (step, img.height, img.width, img.colorspace) == (2, 9, 13, 3)
  np.testing.assert_array_equal(np.asarray(Image.open(_io.BytesIO(img.encoded_image_string))),
                                grid)
  np.testing.assert_array_equal(
      np.asarray(Image.open(_io.BytesIO(images["grey"][1].encoded_image_string))), grey[..., 0])
  with pytest.raises(ValueError, match="uint8"):
    w.write_images(2, "bad", grid.astype(np.float32))
  w.close()

  w = writers.MetricWriter(tmp_path, start_step=1)  # resumed from the checkpoint at step 1
  w.write(2, {"loss": 0.25})
  w.close()
  events = read_events(tmp_path / "tensorboard")
  starts = [e.step for e in events if e.HasField("session_log")]
  assert starts == [1, 2]  # TensorBoard: purge the events from step 2 of earlier files
  assert scalars(events)["loss"] == [(2, 0.5), (2, 0.25)]
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 2, "loss": 0.25}


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(writers.jax, "process_index", lambda: 1)
  w = writers.MetricWriter(tmp_path / "run", start_step=0)
  w.write(1, {"loss": 1.0})
  w.write_images(1, "samples", np.zeros((2, 2, 3), np.uint8))
  w.close()
  assert not (tmp_path / "run").exists()


def test_gcs_workdir(gcs_server, tmp_path, monkeypatch):
  """metrics.jsonl and event files on gs:// (objects cannot be appended to: rewritten
  whole, event files in segments), readable after every write; a resume drops the rows
  after its step; nothing lands on the local disk."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(writers, "_SEGMENT_BYTES", 200)  # a new event file every few writes
  run = f"gs://{gcs_server.bucket}/run"
  w = writers.MetricWriter(run, start_step=0)
  for step in (1, 2, 3, 4):
    w.write(step, {"loss": float(step)})
    assert [r["step"] for r in writers.read_metrics(run)] == list(range(1, step + 1))
  w.write_images(4, "samples", np.full((8, 8, 3), 7, np.uint8))
  # Killed here (no close): every write is already uploaded.
  files = sorted(p.name for p in io.path(f"{run}/tensorboard").iterdir())
  assert len(files) > 1
  events = read_events(f"{run}/tensorboard")
  assert scalars(events)["loss"] == [(s, float(s)) for s in (1, 2, 3, 4)]
  assert any(v.HasField("image") for e in events for v in e.summary.value)

  w = writers.MetricWriter(run, start_step=2)
  w.write(3, {"loss": 30.0})
  w.close()
  assert writers.read_metrics(run) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                                       {"step": 3, "loss": 30.0}]
  assert scalars(read_events(f"{run}/tensorboard"))["loss"][-1] == (3, 30.0)
  assert os.listdir(tmp_path) == []
