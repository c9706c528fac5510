"""Metrics to TensorBoard event files (tensorboardX: no TensorFlow) and metrics.jsonl.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
import os

import jax


class MetricWriter:
  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), step)
    self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()
