"""Two processes joined by jax.distributed.initialize (gloo over loopback) train exactly
like one process with the same global device count, through the real command line.

Both processes share one --workdir (a shared filesystem, as on a pod): process 0 writes
metrics.jsonl; orbax writes one checkpoint from both. The reference is one process with
2 devices, so the mesh (data=2) is the same and only the process split differs.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import _FAST_COMPILE, ROOT, TINY_FLAGS
from diffusion_jax import writers

STEPS = 6
TIMEOUT_S = 300
# Both sides get the same XLA flags, the tests' fast-compile ones (conftest): they cut
# the CPU compile of the tiny model ~4x (the processes compile concurrently on 2
# cores); numerics are those of the same HLO, and the comparison is between runs that
# share these flags.
XLA_FLAGS = _FAST_COMPILE


def _free_port() -> int:
  try:
    import portpicker
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]


def _train_command() -> list[str]:
  script = os.path.join(os.path.dirname(sys.executable), "diffusion-jax-train")
  if os.path.exists(script):
    return [script]
  return [sys.executable, os.path.join(ROOT, "launch", "train.py")]


def _start(workdir, data_dir, log_path, devices, extra=()):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {XLA_FLAGS}")
  cmd = _train_command() + [
      f"--config={os.path.join(ROOT, 'configs', 'quickstart.py')}", f"--workdir={workdir}",
      *TINY_FLAGS, "--config.train.log_every=1", f"--config.data.data_dir={data_dir}",
      f"--config.train.num_steps={STEPS}", "--config.train.checkpoint_every=3", *extra]
  log = open(log_path, "w")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log_path = log_path
  log.close()  # the child holds its own descriptor
  return proc


def _tail(path, n=4000):
  with open(path, errors="replace") as f:
    return f.read()[-n:]


def _wait_all(procs, timeout):
  """Waits for every process; on a timeout or any failure kills the rest and fails
  with the tails of their logs."""
  deadline = time.monotonic() + timeout
  try:
    while True:
      codes = [p.poll() for p in procs]  # every one: any() would stop at the first
      if all(c is not None for c in codes) or time.monotonic() > deadline:
        break
      if any(c not in (None, 0) for c in codes):
        break  # one failed: the others (e.g. waiting on it in a collective) would hang
      time.sleep(0.5)
  finally:
    running = [p for p in procs if p.poll() is None]
    for p in running:
      p.kill()
    for p in running:
      p.wait()
  if running or any(p.returncode != 0 for p in procs):
    report = "\n".join(
        f"--- {os.path.basename(p.log_path)} (rc={p.returncode}"
        f"{', killed' if p in running else ''}) ---\n{_tail(p.log_path)}" for p in procs)
    pytest.fail(f"training processes failed or exceeded {timeout}s:\n{report}")


def _losses(workdir):
  rows = writers.read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  return np.array([r["loss"] for r in rows])


def _restore_numpy(path):
  import orbax.checkpoint as ocp
  ckptr = ocp.PyTreeCheckpointer()
  tree = ckptr.metadata(path)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


@pytest.mark.slow  # ~56 s: two jax.distributed processes over gloo
def test_two_processes_equal_one_process(data_dir, tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  port = _free_port()
  procs = [_start(one, data_dir, tmp_path / "single.log", devices=2)]
  procs += [
      _start(two, data_dir, tmp_path / f"process{i}.log", devices=1,
             extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}", "--cpu_collectives=gloo"))
      for i in range(2)]
  _wait_all(procs, TIMEOUT_S)

  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)
  for step in (3, STEPS):
    assert os.path.isdir(os.path.join(two, "checkpoints", str(step), "state"))
  assert os.path.exists(os.path.join(two, "samples", f"step_{STEPS:07d}.png"))

  a = _restore_numpy(os.path.join(one, "checkpoints", str(STEPS), "state"))
  b = _restore_numpy(os.path.join(two, "checkpoints", str(STEPS), "state"))
  assert int(a["step"]) == int(b["step"]) == STEPS
  for key in ("params", "ema_params"):
    flat_a = jax.tree_util.tree_flatten_with_path(a[key])[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b[key])[0])
    assert len(flat_a) == len(flat_b) > 0
    for path, x in flat_a:
      # atol: biases with an exactly-zero gradient hold ~1e-6 rounding noise (see
      # test_pmap.py); all other parameters agree far more closely.
      np.testing.assert_allclose(flat_b[path], x, rtol=1e-5, atol=1e-5,
                                 err_msg=f"{key}{jax.tree_util.keystr(path)}")
  with open(os.path.join(two, "checkpoints", str(STEPS), "data", "metadata")) as f:
    assert json.load(f) == {"next_index": STEPS}


@pytest.mark.slow  # ~1 min: two jax.distributed processes over gloo, then SIGTERM to both
def test_sigterm_to_both_processes_saves_one_agreed_step(data_dir, tmp_path):
  """SIGTERM to every process of a two-process run mid-training (as a pod's scheduler
  preempts): both agree on one step through JAX's preemption sync point, write one
  checkpoint of it together, and exit 0. (The fast default test of the same logic:
  tests/training/test_resume_safety.py::test_multiprocess_preemption_uses_jax_sync_point.)"""
  w = str(tmp_path / "two")
  procs = _sigterm_two_processes(
      w, data_dir, tmp_path, settle=1.0,  # a few steps past the first metrics row
      ready=lambda rows: bool(rows))
  saved = [int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit()]
  assert len(saved) == 1 and 0 < saved[0] < 100000, saved
  print(f"SIGTERM to both: exit codes {[p.returncode for p in procs]}, saved step {saved[0]}")
  for p in procs:
    log = _tail(p.log_path, 20000)
    assert f"Preempted: saved step {saved[0]}" in log, log[-3000:]
  with open(os.path.join(w, "checkpoints", str(saved[0]), "data", "metadata")) as f:
    assert json.load(f) == {"next_index": saved[0]}


@pytest.mark.slow  # ~1.5 min: two processes; SIGTERM while both evaluate
def test_sigterm_during_an_evaluation_saves_on_both_processes(data_dir, tmp_path):
  """SIGTERM to both processes while the periodic evaluation of step 3 runs (a long
  one: 4,000 samples): they abandon it at the same batch (JAX's sync point, asked
  between batches), save step 3 together and exit 0; no eval/3.json is written."""
  w = str(tmp_path / "two")
  procs = _sigterm_two_processes(
      w, data_dir, tmp_path, settle=2.0,  # into the evaluation of step 3
      ready=lambda rows: any(r["step"] == 3 for r in rows),
      extra=("--config.eval.every=3", "--config.eval.metrics=fd",
             "--config.eval.pixel_features=True", "--config.eval.num_samples=4000",
             "--config.eval.batch_size=16"))
  saved = [int(d) for d in os.listdir(os.path.join(w, "checkpoints")) if d.isdigit()]
  assert saved == [3], saved
  for p in procs:
    log = _tail(p.log_path, 20000)
    assert "Preempted during the evaluation of step 3" in log, log[-3000:]
    assert "Preempted: saved step 3" in log, log[-3000:]
  assert not os.path.exists(os.path.join(w, "eval", "3.json"))


def _sigterm_two_processes(w, data_dir, tmp_path, *, ready, settle, extra=()):
  """Starts a two-process run in w (100,000 steps, no periodic checkpoints or grids),
  waits until ready(metrics rows) and `settle` seconds more, sends SIGTERM to both and
  waits for them (failing unless both exit 0). Returns the processes."""
  port = _free_port()
  procs = [_start(w, data_dir, tmp_path / f"process{i}.log", devices=1,
                  extra=(f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                         f"--process_id={i}", "--cpu_collectives=gloo",
                         "--config.train.num_steps=100000", "--config.train.checkpoint_every=0",
                         "--config.sample.per_class=0", *extra))
           for i in range(2)]
  metrics = os.path.join(w, "metrics.jsonl")
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics) and ready(writers.read_metrics(metrics)):
      break
    time.sleep(0.1)
  time.sleep(settle)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  _wait_all(procs, TIMEOUT_S)
  return procs
