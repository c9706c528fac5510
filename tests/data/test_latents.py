"""Latent caches (diffusion_jax/data/latents.py): the cache equals on-the-fly encoding
through the pipeline (with and without flips), the stored scale factor is 1/std of the
data's latents, an interrupted run resumes to byte-identical files (also after SIGKILL,
-m slow), 8 devices == 1 device, 2 processes == 1, errors name the path or setting, and
(-m slow) diffusion-jax-encode with a trained autoencoder run.

The encoder is made up (no task code): 2×2 average pooling, a fixed random 1×1 map to 2
channels plus a per-position offset (so a flipped image's latent is not the flipped
latent) and a label offset; std from a softplus of another map."""
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data, parallel
from diffusion_jax.data import latents

from conftest import ROOT, _FAST_COMPILE

TEXT = data.TextOptions(max_length=16)


def make_params(channels: int = 1, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"w": rng.standard_normal((channels, 2)).astype(np.float32),
          "v": rng.standard_normal((channels, 2)).astype(np.float32),
          "pos": 0.3 * rng.standard_normal((4, 4, 2)).astype(np.float32)}


def encode(params, x, labels):
  """x [B, 8, 8, C] in [-1, 1], labels [B] -> (mean, std) [B, 4, 4, 2]."""
  b, h, w, c = x.shape
  pooled = x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  mean = pooled @ params["w"] + params["pos"] + 0.01 * labels[:, None, None, None]
  std = 0.2 * jax.nn.softplus(pooled @ params["v"]) + 0.01
  return mean, std


PARAMS = make_params()
_encode_jit = jax.jit(encode)
BATCH = 64  # the cache fixture's batch_size


def on_the_fly(images, labels):
  """encode of images [N, ...] as the writer runs it (batches of BATCH over all devices:
  XLA:CPU's result depends on the per-device batch in the last float bit), unpadded."""
  n = len(images)
  padded = -(-n // BATCH) * BATCH
  images = np.concatenate([images, np.zeros((padded - n,) + images.shape[1:], np.float32)])
  labels = np.concatenate([np.asarray(labels, np.int32), np.zeros(padded - n, np.int32)])
  sharding = parallel.batch_sharding(_mesh(len(jax.devices())))
  out = [_encode_jit(PARAMS, jax.device_put(images[i:i + BATCH], sharding),
                     jax.device_put(labels[i:i + BATCH], sharding))
         for i in range(0, padded, BATCH)]
  return tuple(np.concatenate([np.asarray(o[k]) for o in out])[:n] for k in (0, 1))


def _config(name, data_dir=None, **overrides):
  config = dict(name=name, data_dir=data_dir, split="train", batch_size=BATCH, random_flip=False,
                image_size=0, num_threads=0, prefetch=0)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def _mesh(n):
  return parallel.make_mesh(types.SimpleNamespace(data=-1, fsdp=1), devices=jax.devices()[:n])


def _files(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for f in names:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, directory)] = fh.read()
  return out


@pytest.fixture(scope="module")
def cache(data_dir, tmp_path_factory):
  """sklearn_digits train (1,501) encoded with flips on all 8 devices, 6 chunks."""
  out = str(tmp_path_factory.mktemp("latents") / "digits_latents")
  info = latents.write_split(out, "sklearn_digits", "train", data_dir, encode, PARAMS,
                             flips=True, chunk_size=256, batch_size=BATCH,
                             autoencoder="/runs/made_up_ae", scale=0.5, shift=0.25)
  return out, info


def _digit_arrays(data_dir, n):
  """A dict-of-arrays source: the first n test digits (float32 in [-1, 1]), labels and
  captions (a carried string feature)."""
  images, labels = data.load_arrays("sklearn_digits", "test", data_dir)
  return {"image": images[:n], "label": labels[:n].astype(np.int64),
          "caption": np.array([f"the digit {l} #{i}" for i, l in enumerate(labels[:n])])}


@pytest.mark.parametrize("random_flip", [False, True])
def test_cached_batches_equal_on_the_fly_encoding(cache, data_dir, random_flip):
  path, _ = cache
  pixels = data.make_train_iterator(_config("sklearn_digits", data_dir, random_flip=random_flip),
                                    seed=3, text=TEXT)
  cached = data.make_train_iterator(_config(path, random_flip=random_flip), seed=3, text=TEXT)
  unflipped = data.make_train_iterator(_config(path), seed=3)
  flipped = 0
  for _ in range(2):
    a, b, c = next(pixels), next(cached), next(unflipped)
    assert set(b) == {"mean", "std", "label", "tokens"}
    assert b["mean"].shape == b["std"].shape == (BATCH, 4, 4, 2)
    assert b["mean"].dtype == b["std"].dtype == np.float32 and b["label"].dtype == np.int32
    mean, std = on_the_fly(a["image"], a["label"])
    np.testing.assert_array_equal(b["mean"], mean)
    np.testing.assert_array_equal(b["std"], std)
    np.testing.assert_array_equal(b["label"], a["label"])
    # Captions from the labels, as for the pixels (the cache carries label_captions).
    np.testing.assert_array_equal(b["tokens"], a["tokens"])
    np.testing.assert_array_equal(c["label"], a["label"])  # flips change no order
    flipped += int(np.sum(np.any(b["mean"] != c["mean"], axis=(1, 2, 3))))
  assert flipped > 20 if random_flip else flipped == 0


def test_cache_holds_the_split_in_order_with_its_metadata(cache, data_dir):
  path, info = cache
  arrays, read = latents.load_arrays(path)
  assert read == info
  images, labels = data.load_arrays("sklearn_digits", "train", data_dir)
  mean, std = on_the_fly(images, labels)
  flip_mean, flip_std = on_the_fly(images[:, :, ::-1], labels)
  np.testing.assert_array_equal(arrays["label"], labels)
  for key, want in (("mean", mean), ("std", std), ("flip_mean", flip_mean),
                    ("flip_std", flip_std)):
    np.testing.assert_array_equal(arrays[key], want, err_msg=key)
  assert info.kind == "latents" and info.image_shape == (4, 4, 2)
  assert (info.num_classes, info.num_examples, info.label_captions) == (10, 1501, True)
  assert not info.is_image
  lat = info.latents
  assert (lat.autoencoder, lat.preset, lat.scale, lat.shift) == ("/runs/made_up_ae", "", 0.5, 0.25)
  assert (lat.image_shape, lat.flips, lat.source, lat.split, lat.dtype) == (
      (8, 8, 1), True, "sklearn_digits", "train", "float32")
  # A plain TFDS dataset: TFDS reads it without this library.
  builder = tfds.builder_from_directory(path)
  assert builder.info.metadata["latents"]["data_scale"] == lat.data_scale
  assert builder.info.splits["train"].num_shards == 6
  assert len(builder.as_data_source("train")) == 1501
  assert not os.path.exists(os.path.join(path, "_progress"))


def test_scale_factor_is_one_over_std_of_the_latents(cache):
  path, info = cache
  arrays, _ = latents.load_arrays(path)
  m, s = arrays["mean"].astype(np.float64), arrays["std"].astype(np.float64)
  # Law of total variance: Var z = Var(mean) + E[std²], over examples and elements.
  np.testing.assert_allclose(info.latents.data_scale, 1 / np.sqrt(m.var() + np.mean(s * s)),
                             rtol=1e-10)
  np.testing.assert_allclose(info.latents.data_shift, m.mean(), rtol=1e-10)
  # Sampled latents, as Rombach et al.'s scale_by_std measures them.
  rng = np.random.default_rng(0)
  z = m[None] + s[None] * rng.standard_normal((16,) + m.shape)
  np.testing.assert_allclose(info.latents.data_scale, 1 / z.std(), rtol=3e-3)
  scaled = info.latents.data_scale * (z - info.latents.data_shift)
  assert abs(scaled.mean()) < 0.01 and abs(scaled.std() - 1) < 3e-3


def test_interrupted_run_resumes_to_identical_files(data_dir, tmp_path):
  source = _digit_arrays(data_dir, 296)
  kwargs = dict(chunk_size=64, batch_size=16, dtype="float16", autoencoder="ae")
  whole = str(tmp_path / "whole")
  info = latents.write(whole, source, encode, PARAMS, **kwargs)
  assert info.num_examples == 296 and info.latents.dtype == "float16"

  part = str(tmp_path / "part")
  assert latents.write(part, source, encode, PARAMS, stop_after=2, **kwargs) is None
  progress = os.path.join(part, "_progress")
  assert sorted(f for f in os.listdir(progress) if f.startswith("chunk")) == [
      "chunk-00000.json", "chunk-00001.json"]
  with pytest.raises(ValueError, match="unfinished latent cache"):
    data.get_source(part, "train")
  # A crash after chunk 1's rename but before its record, and a half-written chunk 2.
  os.remove(os.path.join(progress, "chunk-00001.json"))
  with open(os.path.join(progress, "part-train.array_record-00002-of-00005.tmp99"), "wb") as f:
    f.write(b"partial")
  with pytest.raises(ValueError, match="flips=False .now True."):
    latents.write(part, source, encode, PARAMS, flips=True, **kwargs)
  resumed = latents.write(part, source, encode, PARAMS, **kwargs)
  assert resumed == info
  a, b = _files(whole), _files(part)
  rename = lambda f: f.replace("part-", "whole-")
  assert sorted(map(rename, b)) == sorted(a)
  for f in a:
    if f.startswith("whole-"):
      assert b[f.replace("whole-", "part-")] == a[f], f
    elif f != "dataset_info.json":  # it names the dataset ("whole" / "part")
      assert b[f] == a[f], f
  info_a = json.loads(a["dataset_info.json"])
  info_b = json.loads(b["dataset_info.json"])
  assert {**info_b, "name": "whole"} == info_a

  # Float16 storage: the float32 batches are the rounded posteriors; captions carried.
  arrays, _ = latents.load_arrays(part)
  mean, std = on_the_fly(source["image"], source["label"])
  np.testing.assert_array_equal(arrays["mean"], mean.astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(arrays["std"], std.astype(np.float16).astype(np.float32))
  src, _ = data.get_source(part, "train")
  assert src[5]["caption"].decode() == str(source["caption"][5])
  # Complete: a rerun changes nothing; other settings are refused by name.
  assert latents.write(part, source, encode, PARAMS, **kwargs) == info
  assert _files(part) == b
  with pytest.raises(ValueError, match="already holds a latent cache.*dtype='float16'"):
    latents.write(part, source, encode, PARAMS, **{**kwargs, "dtype": "float32"})


def _assert_same_cache(a_dir, b_dir):
  """Two caches of the same source hold the same examples up to float32 rounding (the
  encoder on another device count: XLA:CPU's last bit depends on the per-device batch),
  the same carried features, shard layout and metadata."""
  (a, info_a), (b, info_b) = latents.load_arrays(a_dir), latents.load_arrays(b_dir)
  assert info_a == dataclasses.replace(info_b, latents=dataclasses.replace(
      info_b.latents, data_scale=info_a.latents.data_scale,
      data_shift=info_a.latents.data_shift))
  np.testing.assert_allclose(info_a.latents.data_scale, info_b.latents.data_scale, rtol=1e-6)
  np.testing.assert_allclose(info_a.latents.data_shift, info_b.latents.data_shift, rtol=1e-5)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)
  src_a, src_b = data.get_source(a_dir, "train")[0], data.get_source(b_dir, "train")[0]
  for i in range(0, len(src_a), 7):
    assert {k: v for k, v in src_a[i].items() if k not in latents.POSTERIOR_FEATURES} == {
        k: v for k, v in src_b[i].items() if k not in latents.POSTERIOR_FEATURES}
  shards = lambda d: tfds.builder_from_directory(d).info.splits["train"].shard_lengths
  assert shards(a_dir) == shards(b_dir)
  with open(os.path.join(a_dir, "features.json")) as fa, \
       open(os.path.join(b_dir, "features.json")) as fb:
    assert fa.read() == fb.read()


def test_eight_devices_equal_one_device(data_dir, tmp_path):
  source = _digit_arrays(data_dir, 160)
  kwargs = dict(chunk_size=64, batch_size=32, flips=True)
  # Written as <data_dir>/<name>/<version>: found by name in that data_dir too.
  one = str(tmp_path / "tfds" / "digits_one" / "1.0.0")
  eight = str(tmp_path / "tfds" / "digits_eight" / "1.0.0")
  latents.write(one, source, encode, PARAMS, mesh=_mesh(1), **kwargs)
  latents.write(eight, source, encode, PARAMS, mesh=_mesh(8), **kwargs)
  _assert_same_cache(one, eight)
  _, info = data.get_source("digits_eight", "train", str(tmp_path / "tfds"))
  assert info.kind == "latents" and info.num_examples == 160
  src, _ = data.get_source("digits_eight", "train", str(tmp_path / "tfds"))
  assert src[3]["caption"].decode() == str(source["caption"][3])


def test_errors_name_the_path_or_setting(cache, data_dir, tmp_path):
  path, _ = cache
  missing = str(tmp_path / "no_such_cache")
  with pytest.raises(ValueError, match=f"data.name='{missing}' is a path.*no such directory"):
    data.get_source(missing, "train")
  with pytest.raises(ValueError, match="is a path, but not of a prepared TFDS dataset"):
    data.get_source(str(tmp_path), "train")
  plain = str(tmp_path / "plain")
  latents.write(plain, _digit_arrays(data_dir, 16), encode, PARAMS, batch_size=16)
  with pytest.raises(ValueError, match="random_flip=True.*no flipped posteriors"):
    data.make_train_iterator(_config(plain, batch_size=8, random_flip=True), seed=0)
  with pytest.raises(ValueError, match="image_size=4.*latent cache"):
    data.make_train_iterator(_config(path, image_size=4), seed=0)
  with pytest.raises(ValueError, match="latent cache, which holds no images"):
    data.load_arrays(path, "train")
  # Metadata missing (e.g. copied without metadata.json): named, with the fix.
  broken = str(tmp_path / "broken")
  shutil.copytree(path, broken)
  os.remove(os.path.join(broken, "metadata.json"))
  with pytest.raises(ValueError, match="no latent-cache metadata .metadata.json"):
    data.get_source(broken, "train")
  with pytest.raises(ValueError, match="batch_size=12 must be a positive multiple of the "
                     "device count .8."):
    latents.write(str(tmp_path / "x"), _digit_arrays(data_dir, 16), encode, PARAMS,
                  batch_size=12)
  with pytest.raises(ValueError, match="not empty and holds no latent cache"):
    latents.write(str(tmp_path), _digit_arrays(data_dir, 16), encode, PARAMS, batch_size=16)
  with pytest.raises(ValueError, match=r"encode of a batch of 16 returned mean \(16, 4, 4, 2\) "
                     r"and std \(16, 4, 4\)"):
    latents.write(str(tmp_path / "y"), _digit_arrays(data_dir, 16),
                  lambda p, x, y: (lambda m, s: (m, s[..., 0]))(*encode(p, x, y)), PARAMS,
                  batch_size=16)


# --- real process boundaries -------------------------------------------------------

_WRITER = r"""
import os, sys
sys.path[:0] = [{tests!r}, os.path.join({tests!r}, "data")]
import jax
if {num_processes} > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize("127.0.0.1:{port}", {num_processes}, int(sys.argv[1]))
from diffusion_jax.data import latents
from test_latents import PARAMS, encode
latents.write_split({out!r}, "sklearn_digits", "train", {data_dir!r}, encode, PARAMS,
                    flips=True, chunk_size={chunk}, batch_size=16)
print("done", jax.process_index())
"""


def _writer(tmp_path, out, data_dir, *, num_processes=1, chunk=75, port=0):
  script = tmp_path / f"writer_{os.path.basename(out)}.py"
  script.write_text(_WRITER.format(tests=os.path.join(ROOT, "tests"), out=out, port=port,
                                   data_dir=data_dir, chunk=chunk,
                                   num_processes=num_processes))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {_FAST_COMPILE}")
  return [sys.executable, str(script)], env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(data_dir, tmp_path):
  """Two 1-device processes (gloo over loopback) against this process on 2 devices (the
  same per-device batch). 21 chunks: process 0 encodes 10, process 1 11 (the last of a
  single example), so process 0 idles through the last round."""
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  latents.write_split(one, "sklearn_digits", "train", data_dir, encode, PARAMS, flips=True,
                      chunk_size=75, batch_size=16, mesh=_mesh(2))
  cmd, env = _writer(tmp_path, two, data_dir, num_processes=2, port=_free_port())
  procs = [subprocess.Popen(cmd + [str(i)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  try:
    outs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
  _assert_same_cache(one, two)
  assert sorted(os.listdir(two)) == sorted(f.replace("one-", "two-") for f in os.listdir(one))


@pytest.mark.slow  # a writer killed with SIGKILL mid-run, then resumed (~20 s)
def test_killed_run_resumes_to_identical_files(data_dir, tmp_path):
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  cmd, env = _writer(tmp_path, killed, data_dir, chunk=8)
  proc = subprocess.Popen(cmd + ["0"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  progress = os.path.join(killed, "_progress")
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and proc.poll() is None:
    if os.path.isdir(progress) and sum(f.startswith("chunk") for f in os.listdir(progress)) >= 5:
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the writer finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(killed, "dataset_info.json"))
  subprocess.run(cmd + ["0"], env=env, cwd=ROOT, check=True, timeout=300, capture_output=True)
  cmd, env = _writer(tmp_path, whole, data_dir, chunk=8)
  subprocess.run(cmd + ["0"], env=env, cwd=ROOT, check=True, timeout=300, capture_output=True)
  a, b = _files(whole), _files(killed)
  assert sorted(f.replace("whole-", "killed-") for f in a) == sorted(b)
  for f, content in a.items():
    if f != "dataset_info.json":
      assert b[f.replace("whole-", "killed-")] == content, f


# --- the command line, with a real autoencoder run ------------------------------------


@pytest.mark.slow  # trains a 2-step autoencoder, encodes in fresh processes (~40-60 s)
def test_encode_command_line_with_a_trained_autoencoder(data_dir, tmp_path):
  from conftest import run_cli, tiny_config
  from diffusion_jax.training import loop
  from diffusion_jax.training.tasks import latent

  ae_run = str(tmp_path / "ae")
  loop.train(tiny_config(data_dir, **{
      "task": "autoencoder", "autoencoder.channels": (8, 16), "autoencoder.norm_groups": 4,
      "autoencoder.latent_channels": 2, "autoencoder.disc_weight": 0.0,
      "model.class_conditional": False, "train.num_steps": 2, "sample.per_class": 0}), ae_run)
  out = str(tmp_path / "cache")
  args = [f"--autoencoder={ae_run}", "--dataset=sklearn_digits", f"--data_dir={data_dir}",
          "--split=test", f"--output_dir={out}", "--batch_size=32", "--chunk_size=128",
          "--flips"]
  proc = run_cli("encode", args)
  assert "Wrote 296 latents (4, 4, 2)" in proc.stdout, proc.stdout
  arrays, info = latents.load_arrays(out, "test")
  lat = info.latents
  assert (lat.autoencoder, lat.preset, lat.image_shape, lat.flips) == (ae_run, "", (8, 8, 1), True)
  autoencoder, params = latent.load_autoencoder(ae_run)
  assert (lat.scale, lat.shift) == (autoencoder.scale, autoencoder.shift)
  images, _ = data.load_arrays("sklearn_digits", "test", data_dir)
  enc = jax.jit(lambda p, x: autoencoder.encode(p, x, None))
  for key, x in (("", images), ("flip_", images[:, :, ::-1])):
    mean, std = enc(params, x)
    np.testing.assert_allclose(arrays[key + "mean"], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(arrays[key + "std"], std, rtol=1e-5, atol=1e-5)
  # Re-running the finished command does nothing; bad flags are one line naming them.
  assert "Wrote 296 latents" in run_cli("encode", args).stdout
  bad = run_cli("encode", args[:-4] + [f"--output_dir={tmp_path / 'b'}", "--batch_size=0"],
                check=False)
  assert bad.returncode == 1 and "batch_size=0" in bad.stderr, bad.stderr[-2000:]
  bad = run_cli("encode", [f"--autoencoder={tmp_path / 'none'}"] + args[1:], check=False)
  assert bad.returncode == 1 and "none" in bad.stderr.splitlines()[-1], bad.stderr[-2000:]
