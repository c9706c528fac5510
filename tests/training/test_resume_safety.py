"""Safe resume and the loop's handling of failures: guarded config changes, the whole
difference logged, unreadable checkpoints set aside for the previous one, the metadata
format version, non-finite limits, evaluation errors, preemption during an evaluation,
and the profiler hook. In-process (`loop.train` and diffusion-jax-train's entry point)
on one device, the tiny quickstart-shaped run of conftest."""
import json
import logging
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from conftest import assert_trees_equal, load_state, quickstart_args, run_train_in_process, tiny_config
from diffusion_jax import checkpoint, runs
from diffusion_jax.training import loop

FIXED = ("--config.optim.schedule=constant", "--config.optim.name=sgd",
         "--config.optim.lr=0.05", "--config.optim.warmup_steps=0",
         "--config.train.checkpoint_every=4", "--config.train.async_checkpointing=False")


def _args(w, data_dir, *extra):
  return quickstart_args(w, data_dir, *FIXED, *extra)


@pytest.fixture(scope="module")
def run8(data_dir, tmp_path_factory):
  """8 steps in one go (checkpoints at 4 and 8), in this process on one device."""
  w = tmp_path_factory.mktemp("run8")
  run_train_in_process(_args(w, data_dir, "--config.train.num_steps=8"))
  return w


def _copy(run8, tmp_path):
  w = tmp_path / "w"
  shutil.copytree(run8, w)
  return w


def _steps(w):
  return sorted(int(d) for d in os.listdir(w / "checkpoints") if d.isdigit())


@pytest.mark.parametrize("flag,key", [("--config.seed=1", "seed"),
                                      ("--config.data.batch_size=32", "data.batch_size"),
                                      ("--config.diffusion.prediction=eps", "diffusion.prediction")])
def test_guarded_change_is_refused_by_name(run8, data_dir, tmp_path, flag, key):
  w = _copy(run8, tmp_path)
  before = load_state(w)
  proc = run_train_in_process(_args(w, data_dir, "--config.train.num_steps=10", flag), check=False)
  assert proc.returncode == 1
  assert key in proc.stderr and "allow_changes" in proc.stderr, proc.stderr[-2000:]
  assert _steps(w) == [4, 8]
  assert_trees_equal(load_state(w), before)


def test_allowed_batch_size_change_keeps_the_examples_seen(run8, data_dir, tmp_path):
  """16 → 32 after 8 steps (128 examples): the iterator continues at batch 4 of 32."""
  w = _copy(run8, tmp_path)
  run_train_in_process(_args(w, data_dir, "--config.train.num_steps=10",
                             "--config.data.batch_size=32",
                             "--config.train.allow_changes=('data.batch_size',)"))
  assert _steps(w) == [4, 8, 10]
  with open(w / "checkpoints" / "10" / "data" / "metadata") as f:
    assert json.load(f) == {"next_index": 4 + 2}


def test_resume_logs_the_whole_difference(run8, data_dir, tmp_path, caplog):
  w = _copy(run8, tmp_path)
  c = tiny_config(data_dir, **{"optim.schedule": "constant", "optim.name": "sgd",
                               "optim.lr": 0.01, "optim.warmup_steps": 0,
                               "train.checkpoint_every": 4, "train.num_steps": 9})
  c.train.async_checkpointing = False
  with caplog.at_level(logging.INFO):
    loop.train(c, str(w), devices=jax.devices()[:1])
  text = caplog.text
  assert "changed config" in text and "optim.lr: checkpoint has 0.05, config has 0.01" in text


def _damage(w, step, what):
  d = w / "checkpoints" / str(step)
  if what == "meta":
    path = d / "meta" / "metadata"
  else:  # the largest array data file
    files = [p for p in (d / "state").rglob("*") if p.is_file()]
    path = max(files, key=lambda p: p.stat().st_size)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 3])
  return path


@pytest.mark.parametrize("what", ["meta", "arrays"])
def test_unreadable_latest_falls_back_to_the_previous(run8, data_dir, tmp_path, caplog, what):
  """A truncated file in checkpoint 8: it is moved to damaged_checkpoints/ (kept), the
  run resumes from 4 with a warning naming both, and ends equal to the undamaged run."""
  w = _copy(run8, tmp_path)
  _damage(w, 8, what)
  with caplog.at_level(logging.WARNING):
    run_train_in_process(_args(w, data_dir, "--config.train.num_steps=8"))
  assert "step 8" in caplog.text and "resumes from step 4" in caplog.text, caplog.text[-2000:]
  moved = os.listdir(w / "damaged_checkpoints")
  assert len(moved) == 1 and moved[0].startswith("8-")
  assert _steps(w) == [4, 8]
  assert_trees_equal(load_state(w), load_state(run8))


def test_no_readable_checkpoint_is_an_error_that_moves_nothing(run8, data_dir, tmp_path):
  w = _copy(run8, tmp_path)
  _damage(w, 8, "meta")
  _damage(w, 4, "meta")
  proc = run_train_in_process(_args(w, data_dir, "--config.train.num_steps=8"), check=False)
  assert proc.returncode == 1
  assert "can be read" in proc.stderr and "step 8" in proc.stderr and "step 4" in proc.stderr
  assert _steps(w) == [4, 8] and not (w / "damaged_checkpoints").exists()


def test_metadata_format_version(run8, tmp_path):
  """Checkpoints record runs.FORMAT; one without a version (older runs) reads; a newer
  format is refused by name."""
  w = _copy(run8, tmp_path)
  path = w / "checkpoints" / "8" / "meta" / "metadata"
  meta = json.loads(path.read_text())
  assert meta["format"] == runs.FORMAT
  del meta["format"]
  path.write_text(json.dumps(meta))
  assert runs.read(str(w))[2] == 8
  meta["format"] = runs.FORMAT + 1
  path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match=f"metadata format {runs.FORMAT + 1}"):
    runs.read(str(w))


def test_structure_mismatch_names_the_paths(run8, data_dir):
  """check_structure compares the saved array metadata with a state before anything
  is restored (the loop refuses a mismatch with this list): another width gives
  shape differences by path, a state with an extra entry names it."""
  from diffusion_jax.training import tasks
  sgd = {"optim.name": "sgd", "optim.schedule": "constant", "optim.warmup_steps": 0}
  c = tiny_config(data_dir, **sgd, **{"model.channels": 16})
  task = tasks.make(c, loop.dataset_info(c))
  abstract = jax.eval_shape(task.init, jax.random.key(0))
  mngr = checkpoint.manager(str(run8), read_only=True)
  try:
    problems = checkpoint.check_structure(mngr, 8, abstract)
    same = tasks.make(tiny_config(data_dir, **sgd), loop.dataset_info(c))
    assert checkpoint.check_structure(mngr, 8, jax.eval_shape(same.init, jax.random.key(0))) == []
  finally:
    mngr.close()
  assert any(p.startswith("params/Conv_0/kernel: checkpoint has float32[3, 3, 1, 8], config has "
                          "float32[3, 3, 1, 16]") for p in problems), problems[:5]


def _overflowing(data_dir, **overrides):
  c = tiny_config(data_dir, **{"train.num_steps": 50, "data.batch_size": 8,
                               "model.channel_mult": (1,), "model.attn_resolutions": (),
                               **overrides})
  c.train.async_checkpointing = False
  c.optim.lr, c.optim.grad_clip, c.optim.warmup_steps, c.optim.schedule = 1e38, 0.0, 0, "constant"
  return c


def test_max_nonfinite_stops_a_diverged_run(data_dir, tmp_path):
  """on_nonfinite='skip' with a limit: after 3 skipped steps in a row (read at the log
  interval) the run stops, and every checkpoint is finite."""
  c = _overflowing(data_dir, **{"train.max_nonfinite": 3, "train.log_every": 2,
                                "train.checkpoint_every": 1})
  # step 1 is finite (it moves every parameter by ±1e38), steps 2, 3, 4 are not; the
  # flags are read at every checkpoint and log step, each step counted once
  with pytest.raises(FloatingPointError,
                     match=r"3 non-finite steps in a row up to step 4 .*max_nonfinite=3"):
    loop.train(c, str(tmp_path), devices=jax.devices()[:1])
  steps = _steps(tmp_path)
  assert steps and max(steps) < 10
  params, ema = load_state(tmp_path, max(steps))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((params, ema)))


def _failing_evaluator(calls):
  def make(config, info, workdir, mesh):
    def evaluate(step, params, *, extra, stop):
      calls.append(step)
      raise OSError(f"storage went away at step {step}")
    return evaluate
  return make


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_evaluation_error_is_reported_and_the_checkpoint_kept(data_dir, tmp_path, on_error):
  c = tiny_config(data_dir, **{"eval.every": 2, "eval.on_error": on_error,
                               "train.checkpoint_every": 0, "train.num_steps": 4})
  calls = []
  if on_error == "stop":
    with pytest.raises(RuntimeError, match="evaluation at step 2 failed.*storage went away"):
      loop.train(c, str(tmp_path), devices=jax.devices()[:1],
                 make_evaluator=_failing_evaluator(calls))
    assert _steps(tmp_path) == [2] and calls == [2]
  else:
    loop.train(c, str(tmp_path), devices=jax.devices()[:1],
               make_evaluator=_failing_evaluator(calls))
    assert calls == [2, 4] and _steps(tmp_path) == [2, 4]


def test_sigterm_during_an_evaluation_saves_that_step(data_dir, tmp_path):
  """SIGTERM while the periodic evaluation runs: it stops at its next stop() check,
  the step is saved and training returns without further steps."""
  def make(config, info, workdir, mesh):
    def evaluate(step, params, *, extra, stop):
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(3):  # its batches
        stop()
      raise AssertionError("stop() did not stop the evaluation")
    return evaluate
  c = tiny_config(data_dir, **{"eval.every": 3, "train.checkpoint_every": 0,
                               "train.num_steps": 50})
  state = loop.train(c, str(tmp_path), devices=jax.devices()[:1], make_evaluator=make)
  assert int(state.step) == 3 and _steps(tmp_path) == [3]


def test_multiprocess_preemption_uses_jax_sync_point(monkeypatch):
  """With several processes no Python SIGTERM handler replaces JAX's preemption
  notifier, and `reached` asks JAX's sync point with one increasing counter (the
  real two-process SIGTERM run: tests/training/test_multiprocess.py, -m slow)."""
  asked = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(loop.multihost_utils, "reached_preemption_sync_point",
                      lambda i: asked.append(i) or i == 3)
  before = signal.getsignal(signal.SIGTERM)
  with loop.Preemption() as p:
    assert signal.getsignal(signal.SIGTERM) is before
    assert [p.reached() for _ in range(3)] == [False, False, True]
    with pytest.raises(loop.Preempted):
      p.check()
  assert asked == [1, 2, 3]


def test_profile_steps_writes_a_trace(data_dir, tmp_path):
  c = tiny_config(data_dir, **{"train.profile_steps": (2, 3), "train.num_steps": 4,
                               "sample.per_class": 0})
  loop.train(c, str(tmp_path), devices=jax.devices()[:1])
  traces = list((tmp_path / "tensorboard" / "plugins" / "profile").rglob("*.xplane.pb"))
  assert traces, list((tmp_path / "tensorboard").rglob("*"))
