"""The real command lines, end to end: train, resume, kill -9, sample, bad input.

Runs that are compared use a constant learning-rate schedule without warm-up (a cosine
schedule depends on train.num_steps, which the resume tests change on purpose) and SGD
(Adam divides by sqrt(v) and so amplifies the float-summation-order noise of gradients
that are exactly zero in exact arithmetic, which 8 devices vs 1 changes). One optimizer
for every run here also lets them share compiled programs through the cache (the
in-process run below also with tests/training/test_pmap_cli.py's jit run).

Runs that only need diffusion-jax-train's entry point (errors it reports, a finished
run continued) call it in this process (`run_train_in_process`); the others are real
processes."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import (ROOT, TINY_FLAGS, assert_trees_equal, cli_env, load_state, read_metrics,
                      run_cli, run_train_in_process)
from conftest import quickstart_args as _quickstart_args


def quickstart_args(workdir, data_dir, *extra):
  return _quickstart_args(workdir, data_dir, "--config.optim.schedule=constant",
                          "--config.optim.name=sgd", "--config.optim.lr=0.05",
                          "--config.optim.warmup_steps=0", *extra)


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
  """8 steps in one go (checkpoints at 4 and 8)."""
  w = tmp_path_factory.mktemp("full")
  run_cli("train", quickstart_args(w, data_dir, "--config.train.num_steps=8",
                                   "--config.train.checkpoint_every=4"))
  return w


def test_workdir_layout(full_run):
  w = full_run
  assert sorted(os.listdir(w / "checkpoints")) == ["4", "8"]
  assert (w / "samples" / "step_0000008.png").exists()
  config = json.loads((w / "config.json").read_text())
  assert config["train"]["num_steps"] == 8
  steps = [m["step"] for m in read_metrics(w)]
  assert steps == [2, 4, 6, 8]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(w / "tensorboard"))
  assert not [d for d in os.listdir(w / "checkpoints") if "tmp" in d]


def test_resume_is_exact(full_run, data_dir, tmp_path):
  """4 steps, exit, then the same command with num_steps=8: bitwise equal to 8 in one go.
  (Both halves are real processes: a 1-device run in this 8-device process need not be
  bitwise a 1-device process's, XLA:CPU's thread partitioning differs.)"""
  run_cli("train", quickstart_args(tmp_path, data_dir, "--config.train.num_steps=4",
                                   "--config.train.checkpoint_every=4"))
  run_cli("train", quickstart_args(tmp_path, data_dir, "--config.train.num_steps=8",
                                   "--config.train.checkpoint_every=4"))
  assert_trees_equal(load_state(tmp_path), load_state(full_run))
  losses = {m["step"]: m["loss"] for m in read_metrics(tmp_path)}
  assert losses == {m["step"]: m["loss"] for m in read_metrics(full_run)}


@pytest.mark.slow  # ~20-50 s; the default set keeps test_resume_is_exact, SIGTERM, 8→1 sampling
def test_kill_9_resumes_from_last_complete_checkpoint(full_run, data_dir, tmp_path):
  """kill -9 at a random moment of a run that checkpoints every step; the rerun
  resumes from the last complete checkpoint and ends bitwise equal."""
  args = quickstart_args(tmp_path, data_dir, "--config.train.num_steps=8",
                         "--config.train.checkpoint_every=1")
  env = cli_env(devices=1)
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Wait until training is under way (first checkpoint), then kill at a random moment.
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "1").exists() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(random.uniform(0.0, 1.0))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  run_cli("train", args)
  assert_trees_equal(load_state(tmp_path), load_state(full_run))
  # each logged step once (rows after the resumed checkpoint were dropped on resume)
  assert [m["step"] for m in read_metrics(tmp_path)] == [m["step"] for m in read_metrics(full_run)]
  left = os.listdir(tmp_path / "checkpoints")
  assert not [d for d in left if "tmp" in d], left


@pytest.mark.slow  # ~20-50 s; the default set keeps test_resume_is_exact, SIGTERM, 8→1 sampling
def test_saved_on_8_devices_resumes_on_1(full_run, data_dir, tmp_path):
  """Restore places the state on the current mesh: 4 steps on 8 devices then 4 on 1
  equals 8 steps on 1 device."""
  args = ("--config.train.checkpoint_every=4",)
  run_cli("train", quickstart_args(tmp_path, data_dir, "--config.train.num_steps=4", *args),
          devices=8)
  run_cli("train", quickstart_args(tmp_path, data_dir, "--config.train.num_steps=8", *args))
  assert_trees_equal(load_state(tmp_path), load_state(full_run), rtol=1e-5, atol=1e-6)


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  args = quickstart_args(tmp_path, data_dir, "--config.train.num_steps=100000",
                         "--config.train.checkpoint_every=0", "--config.train.log_every=1")
  env = cli_env(devices=1)
  proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (tmp_path / "metrics.jsonl").exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  assert len(saved) == 1 and 0 < saved[0] < 100000
  assert "Preempted" in err


def test_larger_num_steps_continues_a_finished_run(full_run, data_dir, tmp_path):
  import shutil
  shutil.copytree(full_run, tmp_path / "w")
  run_train_in_process(quickstart_args(tmp_path / "w", data_dir, "--config.train.num_steps=10",
                                       "--config.train.checkpoint_every=4"))
  assert "10" in os.listdir(tmp_path / "w" / "checkpoints")
  assert [m["step"] for m in read_metrics(tmp_path / "w")][-2:] == [8, 10]


def test_sample_deterministic_and_device_independent(full_run, tmp_path):
  """Two 1-device processes write the same samples; 8 devices (the sample command's
  `generate.sample_run` in this 8-device process, on its whole mesh) agree within a
  uint8 level; another seed and sampler change them."""
  from diffusion_jax import io
  from diffusion_jax.training import generate
  outs = []
  for name in ("a", "b"):
    out = tmp_path / f"{name}.npz"
    run_cli("sample", [f"--workdir={full_run}", "--num_samples=10", f"--output={out}",
                       "--labels=3,7", "--seed=5", "--grid"])
    outs.append(np.load(out))
  images, labels, comp = generate.sample_run(str(full_run), 10, ["3", "7"], seed=5)
  assert comp.mesh.devices.size == 8
  outs.append({"images": io.to_uint8(images), "labels": labels})
  for o in outs:
    assert o["images"].shape == (10, 8, 8, 1) and o["images"].dtype == np.uint8
    np.testing.assert_array_equal(o["labels"], [3, 7] * 5)
  np.testing.assert_array_equal(outs[0]["images"], outs[1]["images"])
  # 8 devices vs 1: same up to float tolerance (one uint8 level)
  diff = np.abs(outs[0]["images"].astype(int) - outs[2]["images"].astype(int))
  assert diff.max() <= 1
  assert (tmp_path / "a.png").exists()
  other = tmp_path / "d.npz"
  run_cli("sample", [f"--workdir={full_run}", "--num_samples=10", f"--output={other}",
                     "--labels=3,7", "--seed=6", "--sampler=ddim", "--steps=3", "--guidance=0"])
  assert not np.array_equal(np.load(other)["images"], outs[0]["images"])


@pytest.mark.parametrize("extra,message", [
    (["--config.optim.lrr=1"], "lrr"),
    (["--config.optim.lr=abc"], "optim.lr"),
    (["--config.data.name=no_such_dataset"], "no_such_dataset"),
    (["--config.data.batch_size=12"], "data.batch_size"),
    (["--config.diffusion.path=bogus"], "diffusion.path"),
])
def test_bad_input_is_named(data_dir, tmp_path, extra, message):
  """diffusion-jax-train's entry point on 8 devices (in this process): one line naming
  the bad value, exit status 1, no traceback (an uncaught exception fails the test)."""
  proc = run_train_in_process(quickstart_args(tmp_path, data_dir, *extra), devices=None,
                              check=False)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr.split("error:")[-1]


def test_missing_config_file(tmp_path):
  proc = run_train_in_process([f"--config={tmp_path}/nope.py", f"--workdir={tmp_path}"],
                              check=False)
  assert proc.returncode != 0 and "nope.py" in proc.stderr


def test_incompatible_checkpoint_is_refused_and_kept(full_run, data_dir, tmp_path):
  import shutil
  w = tmp_path / "w"
  shutil.copytree(full_run, w)
  before = {p: (w / p).read_bytes() for p in ("config.json", "metrics.jsonl")}
  proc = run_train_in_process(quickstart_args(w, data_dir, "--config.model.channels=16"),
                              check=False)
  assert proc.returncode != 0
  assert "model.channels" in proc.stderr and "incompatible" in proc.stderr
  assert sorted(os.listdir(w / "checkpoints")) == ["4", "8"]
  assert {p: (w / p).read_bytes() for p in before} == before
  assert_trees_equal(load_state(w), load_state(full_run))


def _digits_npz(data_dir, path, n=6):
  from diffusion_jax import data, io
  x, y = data.load_arrays("sklearn_digits", "test", data_dir)
  np.savez(path, images=io.to_uint8(x[:n]), labels=y[:n])
  return io.to_uint8(x[:n]), y[:n]


def test_sdedit_and_inpainting_through_the_command_line(full_run, data_dir, tmp_path):
  """--input + --inpaint=center + --strength: pixels outside the centre are the input's,
  exactly; the labels come from the input file."""
  images, labels = _digits_npz(data_dir, tmp_path / "in.npz")
  out = tmp_path / "out.npz"
  run_cli("sample", [f"--workdir={full_run}", "--num_samples=6", f"--output={out}",
                     f"--input={tmp_path / 'in.npz'}", "--inpaint=center", "--strength=0.7",
                     "--sampler=ddpm"])
  res = np.load(out)
  np.testing.assert_array_equal(res["labels"], labels)
  keep = np.ones((8, 8), bool)
  keep[2:6, 2:6] = False
  np.testing.assert_array_equal(res["images"][:, keep], images[:, keep])
  assert not np.array_equal(res["images"][:, ~keep], images[:, ~keep])
  proc = run_cli("sample", [f"--workdir={full_run}", f"--output={out}", "--inpaint=center"],
                 check=False)
  assert proc.returncode != 0 and "needs input images" in proc.stderr


@pytest.mark.slow  # CI time (cold compile cache); other default tests hold this invariant
def test_classifier_task_and_guidance_through_the_command_line(full_run, data_dir, tmp_path):
  """configs/digits_classifier.py trains (accuracy logged) and guides the flow model;
  a diffusion run is refused as a classifier, by name."""
  cls = tmp_path / "cls"
  run_cli("train", [f"--config={os.path.join(ROOT, 'configs', 'digits_classifier.py')}",
                    f"--workdir={cls}", f"--config.data.data_dir={data_dir}", *TINY_FLAGS,
                    "--config.train.num_steps=4"])
  metrics = read_metrics(cls)
  assert metrics[-1]["step"] == 4 and 0 <= metrics[-1]["accuracy"] <= 1
  out = tmp_path / "g.npz"
  run_cli("sample", [f"--workdir={full_run}", "--num_samples=4", f"--output={out}",
                     f"--classifier_workdir={cls}", "--classifier_scale=3", "--labels=1"])
  assert np.load(out)["images"].shape == (4, 8, 8, 1)
  proc = run_cli("sample", [f"--workdir={full_run}", "--num_samples=4", f"--output={out}",
                            f"--classifier_workdir={full_run}"], check=False)
  assert proc.returncode != 0 and "provides no classifier guidance" in proc.stderr


@pytest.mark.slow  # ~20-50 s; the default set keeps test_resume_is_exact, SIGTERM, 8→1 sampling
def test_superres_cascade_through_the_command_line(data_dir, tmp_path):
  """A 4×4 → 8×8 super-resolution run trains (its grid conditions on training images)
  and samples from a low-res .npz (here, digits downsampled by the command itself)."""
  run_cli("train", quickstart_args(tmp_path / "sr", data_dir, "--config.superres.low_res=4",
                                   "--config.superres.noise_aug=0.1",
                                   "--config.train.num_steps=2"))
  assert (tmp_path / "sr" / "samples" / "step_0000002.png").exists()
  _digits_npz(data_dir, tmp_path / "in.npz")
  out = tmp_path / "hi.npz"
  run_cli("sample", [f"--workdir={tmp_path / 'sr'}", "--num_samples=6", f"--output={out}",
                     f"--input={tmp_path / 'in.npz'}"])
  assert np.load(out)["images"].shape == (6, 8, 8, 1)
