"""The evaluation command end to end, and its invariants: sharded over 8 devices equals
1 device, and an interrupted evaluation resumes to the same numbers."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY_FLAGS, quickstart_args, run_cli
from diffusion_jax import config as config_lib, parallel
from diffusion_jax.evaluation import run as eval_run


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """A tiny diffusion run and a tiny clean-image domain classifier run (CLI)."""
  w = tmp_path_factory.mktemp("eval")
  run_cli("train", quickstart_args(w / "model", data_dir, "--config.train.num_steps=4"))
  run_cli("train", [f"--config={os.path.join(ROOT, 'configs', 'digits_classifier.py')}",
                    f"--workdir={w / 'cls'}", f"--config.data.data_dir={data_dir}", *TINY_FLAGS,
                    "--config.classifier.noise_conditional=False",
                    "--config.train.num_steps=4"])
  return w


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
  resumed: the same numbers."""
  ref = json.loads((runs / "model" / "eval" / "4.json").read_text())
  kw = dict(metrics=("fd", "kid", "pr", "acc", "is"), num_samples=40, batch_size=16,
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
