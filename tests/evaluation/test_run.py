"""The evaluation command end to end, and its invariants: sharded over 8 devices equals
1 device, an interrupted evaluation resumes to the same numbers, and the training
loop's periodic evaluation equals the command's on the same checkpoint."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY_FLAGS, quickstart_args, run_cli
from diffusion_jax import config as config_lib, parallel
from diffusion_jax.evaluation import run as eval_run


SAMPLE_METRICS = ("fd", "kid", "pr", "acc", "is")


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """A tiny clean-image domain classifier run, then a tiny diffusion run that evaluates
  itself every 2 steps in that feature space (CLI). The loop's eval/ is kept aside as
  loop_eval/ (the tests below rewrite eval/)."""
  w = tmp_path_factory.mktemp("eval")
  run_cli("train", [f"--config={os.path.join(ROOT, 'configs', 'digits_classifier.py')}",
                    f"--workdir={w / 'cls'}", f"--config.data.data_dir={data_dir}", *TINY_FLAGS,
                    "--config.classifier.noise_conditional=False",
                    "--config.train.num_steps=4"])
  run_cli("train", quickstart_args(
      w / "model", data_dir, "--config.train.num_steps=4", "--config.eval.every=2",
      f"--config.eval.feature_workdir={w / 'cls'}", f"--config.eval.metrics={SAMPLE_METRICS}",
      "--config.eval.num_samples=40", "--config.eval.batch_size=16"))
  shutil.copytree(w / "model" / "eval", w / "model" / "loop_eval")
  return w


def test_training_loop_evaluates_periodically(runs):
  loop_eval = runs / "model" / "loop_eval"
  assert sorted(f for f in os.listdir(loop_eval) if f.endswith(".json")) == ["2.json", "4.json"]
  rows = [json.loads(l) for l in (loop_eval / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4]
  assert 0 < rows[0]["train_seconds"] < rows[1]["train_seconds"]
  for r in rows:
    assert np.isfinite(r["fd_domain"]) and 0 <= r["acc_domain"] <= 1


def test_evaluate_command(runs, tmp_path):
  proc = run_cli("evaluate", [f"--workdir={runs / 'model'}", f"--feature_workdir={runs / 'cls'}",
                              "--metrics=fd,kid,pr,acc,is,bpd_vlb,bpd_ode", "--num_samples=40",
                              "--batch_size=16", "--likelihood_images=12",
                              "--likelihood_steps=4"])
  results = json.loads((runs / "model" / "eval" / "4.json").read_text())
  assert json.loads(proc.stdout) == results
  for k in ("fd_domain", "fd_domain_floor", "kid_domain", "kid_domain_floor",
            "precision_domain", "recall_domain", "acc_domain", "is_domain", "bpd_vlb", "bpd_ode"):
    assert np.isfinite(results[k]), k
  assert results["bpd_vlb"] > 0 and results["likelihood_images"] == 12
  assert results["fd_domain"] >= 0 and len(results["acc_domain_per_class"]) == 10
  assert results["reference"] == "sklearn_digits:test"
  assert not [f for f in os.listdir(runs / "model" / "eval") if f.startswith("partial")]
  assert os.path.exists(runs / "cls" / "ref_stats" / "sklearn_digits_test.npz")
  with np.load(runs / "cls" / "ref_stats" / "sklearn_digits_test.npz") as f:
    assert f["mu"].shape == (16,) and f["sigma"].shape == (16, 16)  # pytorch-fid layout
  bad = run_cli("evaluate", [f"--workdir={runs / 'model'}", f"--feature_workdir={runs / 'model'}"],
                check=False)
  assert bad.returncode != 0 and "must be a run of the 'classifier' task" in bad.stderr
  bad = run_cli("evaluate", [f"--workdir={runs / 'model'}", "--metrics=fd,bogus"], check=False)
  assert bad.returncode != 0 and "bogus" in bad.stderr


def test_interrupted_on_8_devices_equals_uninterrupted_on_1(runs):
  """The command above ran on 1 device; here 8 devices, stopped after one batch, then
  resumed: the same numbers. Both equal the training loop's own evaluation."""
  ref = json.loads((runs / "model" / "eval" / "4.json").read_text())
  loop = json.loads((runs / "model" / "loop_eval" / "4.json").read_text())
  for k, v in loop.items():
    if isinstance(v, float) and k != "train_seconds":
      np.testing.assert_allclose(ref[k], v, rtol=1e-3, atol=1e-5, err_msg=k)
  kw = dict(metrics=SAMPLE_METRICS, num_samples=40, batch_size=16,
            mesh=parallel.make_mesh(config_lib.base().mesh, jax.devices()))
  assert eval_run.evaluate(str(runs / "model"), str(runs / "cls"), max_batches=1, **kw) is None
  assert [f for f in os.listdir(runs / "model" / "eval") if f.startswith("partial")]
  res = eval_run.evaluate(str(runs / "model"), str(runs / "cls"), **kw)
  for k, v in ref.items():
    if k.startswith("bpd") or k.startswith("likelihood"):
      continue  # (not recomputed here: a per-example vmap, device-independent by construction)
    if isinstance(v, float):
      np.testing.assert_allclose(res[k], v, rtol=1e-3, atol=1e-5, err_msg=k)
    else:
      assert res[k] == v, k


@pytest.mark.slow
def test_inception_features(runs, tmp_path):
  """FID Inception-v3 features (random weights, in the converted .npz format) through
  the evaluator beside the domain network: `*_inception` keys, 2048-d reference stats
  in the pytorch-fid layout, and a mu/sigma-only stats file (another FID tool's) is
  used for FD and refused, by name, for KID."""
  from diffusion_jax.nets import inception
  variables = jax.jit(inception.InceptionV3().init)(jax.random.key(0),
                                                     np.zeros((1, 8, 8, 3), np.float32))
  weights = tmp_path / "fid_inception.npz"
  inception.save_npz(str(weights), variables)
  kw = dict(num_samples=16, batch_size=16, reference_split="test[:24]",
            floor_split="train[:24]", inception_weights=str(weights),
            ref_stats_dir=str(tmp_path / "stats"))
  res = eval_run.evaluate(str(runs / "model"), str(runs / "cls"),
                          metrics=("fd", "kid", "pr", "is", "acc"), **kw)
  for k in ("fd_inception", "fd_inception_floor", "kid_inception", "precision_inception",
            "recall_inception", "is_inception", "fd_domain", "acc_domain"):
    assert np.isfinite(res[k]), k
  assert res["fd_inception"] >= 0 and 1 <= res["is_inception"] <= inception.NUM_CLASSES
  assert "acc_inception" not in res
  [stats] = (tmp_path / "stats" / "inception").glob("sklearn_digits_test*.npz")
  with np.load(stats) as f:
    mu, sigma = f["mu"], f["sigma"]
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
  np.savez(stats, mu=mu, sigma=sigma)  # what pytorch-fid --save-stats writes
  again = eval_run.evaluate(str(runs / "model"), metrics=("fd",), **kw)
  np.testing.assert_allclose(again["fd_inception"], res["fd_inception"], rtol=1e-6)
  with pytest.raises(ValueError, match=f"{stats.name} holds only mu and sigma"):
    eval_run.evaluate(str(runs / "model"), metrics=("kid",), **kw)
