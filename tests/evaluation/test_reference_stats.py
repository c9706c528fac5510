"""Reference statistics stream from the split batch by batch and equal the in-memory
statistics; their cache is keyed by the feature network and the data; an evaluation's
partial state is a run of whole chunk files, read back only where contiguous."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config as config_lib, data, io, parallel
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import metrics, run as eval_run

SHAPE = (4, 4, 1)
PROJ = np.random.default_rng(5).standard_normal((16, 6)).astype(np.float32) / 4


def _mesh(n):
  return parallel.make_mesh(config_lib.base().mesh, jax.devices()[:n])


def _images(start, stop):
  """Image i is drawn from seed i alone: any read of rows a..b is the same rows."""
  return np.stack([np.random.default_rng(i).uniform(-1, 1, SHAPE).astype(np.float32)
                   for i in range(start, stop)])


def _synthetic(n, reads, **key):
  """n examples read on demand, every read (start, stop) recorded in `reads`."""
  def read_rows(a, b):
    reads.append((a, b))
    return _images(a, b), (np.arange(a, b) % 3).astype(np.int32)
  key = {"name": "synthetic", "dir": "/data/a/synthetic/1.0.0", "version": "1.0.0",
         "split": "train", "image_size": 0, "labels": [], "max_examples": 0,
         "num_examples": n, **key}
  return pipeline.Arrays(read_rows, n, SHAPE, "synthetic", key)


def _net(stats_dir, identity="/runs/cls@step=1"):
  image = lambda p, x: (jnp.zeros((len(x), 1)), jnp.tanh(x.reshape(len(x), -1) @ p))
  return eval_run.FeatureNet("domain", image, PROJ, str(stats_dir), "/runs/cls",
                             identity=identity)


def test_reference_stats_stream_batch_by_batch_and_equal_in_memory_ones(tmp_path):
  """1000 examples in batches of 64 over 8 devices: no read is larger than a batch,
  every row is read once; the features are those of the whole array at once, and μ, Σ
  are their float64 mean and covariance (as `Moments` of all of them in one update);
  1 device with batches of 100 gives the same."""
  n, batch, reads = 1000, 64, []
  stats = eval_run.reference_stats(_net(tmp_path / "a"), _synthetic(n, reads), _mesh(8),
                                   batch=batch)
  assert max(b - a for a, b in reads) <= batch
  assert sorted(reads) == [(a, min(a + batch, n)) for a in range(0, n, batch)]
  want = np.tanh(_images(0, n).reshape(n, -1).astype(np.float64) @ PROJ.astype(np.float64))
  np.testing.assert_allclose(stats["features"], want, rtol=1e-5, atol=1e-6)
  f = stats["features"].astype(np.float64)
  mu, sigma = metrics.Moments.zeros(6).update(f).mean_cov()
  np.testing.assert_allclose(stats["mu"], mu, rtol=1e-12)
  np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-10, atol=1e-15)
  np.testing.assert_allclose(stats["sigma"], np.cov(f, rowvar=False), rtol=1e-10, atol=1e-15)
  np.testing.assert_array_equal(stats["labels"], np.arange(n) % 3)

  one = eval_run.reference_stats(_net(tmp_path / "b"), _synthetic(n, []), _mesh(1), batch=100)
  np.testing.assert_allclose(one["features"], stats["features"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(one["sigma"], stats["sigma"], rtol=1e-5, atol=1e-9)


def test_reference_stats_cache_is_keyed_by_the_network_and_the_data(tmp_path, data_dir):
  stats_dir = tmp_path / "stats"
  net, arrays = _net(stats_dir), _synthetic(10, [])
  path = eval_run.reference_path(net, arrays)
  assert path.parent == io.path(stats_dir) and path.name.startswith("synthetic_train_")
  assert eval_run.reference_path(_net(stats_dir), _synthetic(10, [])) == path   # same inputs
  changed = [eval_run.reference_path(_net(stats_dir, "/runs/cls@step=2"), arrays),
             eval_run.reference_path(_net(stats_dir, "/runs/other@step=1"), arrays),
             eval_run.reference_path(net, arrays.first(5))]
  for k, v in (("dir", "/data/b/synthetic/1.0.0"), ("version", "1.0.1"), ("split", "test"),
               ("image_size", 8), ("labels", [1]), ("max_examples", 5)):
    changed.append(eval_run.reference_path(net, _synthetic(10, [], **{k: v})))
  assert len({path, *changed}) == len(changed) + 1

  # A real split: another data_dir, or a subset, is another key.
  other = tmp_path / "tfds2"
  data.prepare("sklearn_digits", other)
  keys = [pipeline.open_arrays("sklearn_digits", "test", d).key for d in (data_dir, other)]
  assert keys[0]["dir"] != keys[1]["dir"] and keys[0]["num_examples"] == 296
  assert (pipeline.open_arrays("sklearn_digits", "test", data_dir, labels=(3,)).key
          != keys[0])
  paths = {eval_run.reference_path(net, pipeline.open_arrays("sklearn_digits", "test", d))
           for d in (data_dir, other)}
  assert len(paths) == 2

  # Computed once and written whole (no temporary left); the same key reads nothing.
  reads = []
  first = eval_run.reference_stats(net, _synthetic(10, reads), _mesh(1), batch=4)
  assert reads and [p.name for p in path.parent.iterdir()] == [path.name]
  with np.load(path) as f:
    assert json.loads(str(f["key"])) == eval_run.reference_key(net, arrays)
  reads = []
  again = eval_run.reference_stats(net, _synthetic(10, reads), _mesh(1), batch=4)
  assert not reads and again["path"] == first["path"] == str(path)
  for k in ("mu", "sigma", "features", "labels"):
    np.testing.assert_array_equal(again[k], first[k])
  eval_run.reference_stats(_net(stats_dir, "/runs/cls@step=2"), _synthetic(10, reads), _mesh(1))
  assert reads and len(list(path.parent.iterdir())) == 2
  with pytest.raises(ValueError, match="open_arrays"):
    eval_run.reference_path(net, pipeline.Arrays.of(_images(0, 4)))


def test_reference_stats_for_frechet_distances_alone_keep_no_features(tmp_path):
  """features=False (FD only): moments alone, the same μ, Σ; a later call that needs the
  features computes the file again. A mu/sigma-only file without a key (pytorch-fid
  --save-stats) dropped under the name is used as it is."""
  net, mesh = _net(tmp_path), _mesh(1)
  fd_only = eval_run.reference_stats(net, _synthetic(100, []), mesh, batch=32, features=False)
  assert fd_only["features"] is None and fd_only["labels"] is None
  with np.load(fd_only["path"]) as f:
    assert "features" not in f.files and "key" in f.files
  reads = []
  full = eval_run.reference_stats(net, _synthetic(100, reads), mesh, batch=32)
  assert reads and full["features"].shape == (100, 6) and full["path"] == fd_only["path"]
  np.testing.assert_allclose(full["sigma"], fd_only["sigma"], rtol=1e-12)
  np.savez(full["path"], mu=full["mu"], sigma=full["sigma"])
  reads = []
  other = eval_run.reference_stats(net, _synthetic(100, reads), mesh, batch=32)
  assert not reads and other["features"] is None
  np.testing.assert_array_equal(other["sigma"], full["sigma"])


def test_partial_state_is_the_contiguous_chunks_from_sample_0(tmp_path):
  """Chunks 0-4 and 4-8 are read back; after the gap (8-12 missing, a writer's
  temporary of it beside) 12-16 is not."""
  d = io.path(tmp_path / "partial_4_abc")
  chunk = lambda a, b: eval_run._npz_bytes({"domain_features": np.full((b - a, 2), a, np.float32)})
  for a, b in ((0, 4), (4, 8), (12, 16)):
    io.write_atomic(d / eval_run._chunk_name(a, b), chunk(a, b))
  (d / (eval_run._chunk_name(8, 12) + ".tmp-0123456789ab")).write_bytes(b"torn")
  done, acc = eval_run._read_partial(d, ["domain_features"])
  assert done == 8 and [a[0, 0] for a in acc["domain_features"]] == [0, 4]
  assert eval_run._read_partial(io.path(tmp_path / "none"), ["domain_features"])[0] == 0


def test_reference_stats_and_partial_state_on_cloud_storage():
  """The same files on gs:// (a GCS-protocol server on loopback): reference statistics
  written once and read back by key, partial chunks appended and read back."""
  from gcs_emulator import gcs
  with gcs("bkt"):
    net = _net("gs://bkt/stats")
    reads = []
    first = eval_run.reference_stats(net, _synthetic(12, reads), _mesh(1), batch=8)
    assert reads and first["path"].startswith("gs://bkt/stats/synthetic_train_")
    assert [p.name for p in io.path("gs://bkt/stats").iterdir()] == [io.path(first["path"]).name]
    reads = []
    again = eval_run.reference_stats(net, _synthetic(12, reads), _mesh(1), batch=8)
    assert not reads
    np.testing.assert_array_equal(again["sigma"], first["sigma"])
    d = io.path("gs://bkt/run/eval/partial_4_abc")
    for a, b in ((0, 4), (4, 8)):
      io.write_atomic(d / eval_run._chunk_name(a, b),
                      eval_run._npz_bytes({"x": np.full((b - a, 2), a, np.float32)}))
    done, acc = eval_run._read_partial(d, ["x"])
    assert done == 8 and [a[0, 0] for a in acc["x"]] == [0, 4]
    d.rmtree()
    assert not d.exists()
