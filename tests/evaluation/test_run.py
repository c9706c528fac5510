"""The evaluation command end to end, and its invariants: sharded over 8 devices equals
1 device, an interrupted evaluation resumes to the same numbers, the training loop's
periodic evaluation equals the command's on the same checkpoint, and its bits/dim are
`diffusion/likelihood.py`'s; a VAE run's samples, bounds and reconstructions through the
command (closed-form checks of those metrics: test_reconstruction.py)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import ROOT, TINY_FLAGS, quickstart_args, run_cli, run_train_in_process
from diffusion_jax import config as config_lib, data, parallel, runs as runs_lib, samplers
from diffusion_jax.diffusion import likelihood, predictions
from diffusion_jax.evaluation import metrics as metrics_lib, run as eval_run
from diffusion_jax.training import tasks


SAMPLE_METRICS = ("fd", "kid", "pr", "acc", "is")
LIKELIHOOD = dict(images=12, steps=4)


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """A tiny clean-image domain classifier run, then a tiny diffusion run that evaluates
  itself every 2 steps in that feature space (diffusion-jax-train's entry point, in
  process: it passes the evaluator to the loop). The loop's eval/ is kept aside as loop_eval/ (the tests below
  rewrite eval/)."""
  w = tmp_path_factory.mktemp("eval")
  run_train_in_process([f"--config={os.path.join(ROOT, 'configs', 'digits_classifier.py')}",
                        f"--workdir={w / 'cls'}", f"--config.data.data_dir={data_dir}",
                        *TINY_FLAGS, "--config.classifier.noise_conditional=False",
                        "--config.train.num_steps=4"])
  run_train_in_process(quickstart_args(
      w / "model", data_dir, "--config.train.num_steps=4", "--config.eval.every=2",
      f"--config.eval.feature_workdir={w / 'cls'}", f"--config.eval.metrics={SAMPLE_METRICS}",
      "--config.eval.num_samples=40", "--config.eval.batch_size=16"))
  shutil.copytree(w / "model" / "eval", w / "model" / "loop_eval")
  return w


@pytest.fixture(scope="module")
def evaluated(runs):
  """diffusion-jax-evaluate on the model's last checkpoint (1 device), every metric
  but clip_score: (its stdout, eval/4.json as it wrote it)."""
  proc = run_cli("evaluate", [
      f"--workdir={runs / 'model'}", f"--config.eval.feature_workdir={runs / 'cls'}",
      "--config.eval.metrics=fd,kid,pr,acc,is,bpd_vlb,bpd_ode",
      "--config.eval.pixel_features=True",
      "--config.eval.num_samples=40", "--config.eval.batch_size=16",
      f"--config.eval.likelihood_images={LIKELIHOOD['images']}",
      f"--config.eval.likelihood_steps={LIKELIHOOD['steps']}"])
  return proc.stdout, json.loads((runs / "model" / "eval" / "4.json").read_text())


def test_training_loop_evaluates_periodically(runs):
  loop_eval = runs / "model" / "loop_eval"
  assert sorted(f for f in os.listdir(loop_eval) if f.endswith(".json")) == ["2.json", "4.json"]
  rows = [json.loads(l) for l in (loop_eval / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [2, 4]
  assert 0 < rows[0]["train_seconds"] < rows[1]["train_seconds"]
  for r in rows:
    assert np.isfinite(r["fd_domain"]) and 0 <= r["acc_domain"] <= 1


def test_evaluate_command(runs, evaluated, data_dir):
  stdout, results = evaluated
  assert json.loads(stdout) == results
  for k in ("fd_domain", "fd_domain_floor", "kid_domain", "kid_domain_floor",
            "precision_domain", "recall_domain", "acc_domain", "is_domain", "bpd_vlb", "bpd_ode"):
    assert np.isfinite(results[k]), k
  assert results["likelihood_images"] == LIKELIHOOD["images"]
  assert results["fd_domain"] >= 0 and len(results["acc_domain_per_class"]) == 10
  assert results["reference"] == "sklearn_digits:test"
  assert not [f for f in os.listdir(runs / "model" / "eval") if f.startswith("partial")]
  # Cached per feature network, keyed by its run and checkpoint step and by the data.
  [stats] = (runs / "cls" / "ref_stats").glob("sklearn_digits_test_*.npz")
  with np.load(stats) as f:
    assert f["mu"].shape == (16,) and f["sigma"].shape == (16, 16)  # pytorch-fid layout
    key = json.loads(str(f["key"]))
  assert key["features"] == f"{runs / 'cls'}@step=4"
  assert key["data"]["split"] == "test" and key["data"]["num_examples"] == 296
  assert key["data"]["dir"].startswith(str(data_dir))
  assert not [f for f in os.listdir(runs / "cls" / "ref_stats") if ".tmp" in f]
  model = str(runs / "model")
  with pytest.raises(ValueError, match=f"feature_workdir={model} is a config.task="
                     "'diffusion' run, which provides no features"):
    eval_run.evaluate(model, overrides={"eval.feature_workdir": model})
  with pytest.raises(ValueError, match="bogus"):
    eval_run.evaluate(model, overrides={"eval.metrics": ("fd", "bogus")})
  bad = run_cli("evaluate", [f"--workdir={model}", "--config.model.channels=4"], check=False)
  assert bad.returncode != 0 and "config.model.channels" in bad.stderr


def test_pixel_features_floor_is_the_frechet_distance_of_the_splits(evaluated, data_dir):
  """fd_pixels_floor (train vs test, eval.pixel_features) equals the Fréchet distance of
  the two splits' flattened pixels computed here with numpy moments."""
  _, results = evaluated
  moments = []
  for split in ("train", "test"):
    x, _ = data.load_arrays("sklearn_digits", split, data_dir)
    flat = np.asarray(x, np.float64).reshape(len(x), -1)
    moments += [flat.mean(0), np.cov(flat, rowvar=False)]
  np.testing.assert_allclose(results["fd_pixels_floor"],
                             metrics_lib.frechet_distance(*moments), rtol=1e-4)
  assert np.isfinite(results["fd_pixels"]) and results["fd_pixels"] > 0


def test_bits_per_dim_are_the_likelihood_module_s(runs, evaluated, data_dir):
  """The command's bpd_ode and bpd_vlb equal `likelihood.bits_per_dim_dequantized` and
  `likelihood.vlb_terms` called here on the same images, image i alone with the key
  fold_in(key(seed), i), through the task's Likelihood."""
  _, results = evaluated
  comp = runs_lib.load(str(runs / "model"))
  lik = tasks.make(comp.config, comp.info).likelihood
  path, pred, steps = lik.path, lik.prediction, LIKELIHOOD["steps"]
  images = data.load_arrays("sklearn_digits", "test", data_dir)[0][:LIKELIHOOD["images"]]
  grid = None if path.discrete else likelihood.geometric_grid(steps)

  def ode(params, x, key):
    den = samplers.make_denoiser(lambda x_t, t, y: lik.model_fn(params, x_t, t), path, pred,
                                 None)
    return likelihood.bits_per_dim_dequantized(path, den, x, key, num_steps=steps)

  def vlb(params, x, key):
    x0_fn = lambda x_t, t: predictions.to_x0_eps(path, pred, lik.model_fn(params, x_t, t),
                                                 x_t, t)[0]
    nats = likelihood.vlb_terms(path, x0_fn, x, key, grid=grid)["total"]
    return likelihood.bits_per_dim(nats, x[0].size)

  key = jax.random.key(comp.config.eval.seed)
  for name, fn in (("bpd_ode", ode), ("bpd_vlb", vlb)):
    fn = jax.jit(fn)
    bpd = np.array([float(fn(comp.params, images[i:i + 1], jax.random.fold_in(key, i))[0])
                    for i in range(len(images))])
    np.testing.assert_allclose(results[name], bpd.mean(), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(results[name + "_stderr"], bpd.std() / np.sqrt(len(bpd)),
                               rtol=1e-3, err_msg=name)


def test_interrupted_on_8_devices_equals_uninterrupted_on_1(runs, evaluated):
  """The command above ran on 1 device; here 8 devices, stopped after one batch twice
  (the partial state grows by one file per batch, never rewritten), then resumed: the
  same numbers. Both equal the training loop's own evaluation."""
  _, ref = evaluated
  loop = json.loads((runs / "model" / "loop_eval" / "4.json").read_text())
  for k, v in loop.items():
    if isinstance(v, float) and k != "train_seconds":
      np.testing.assert_allclose(ref[k], v, rtol=1e-3, atol=1e-5, err_msg=k)
  overrides = {"eval.feature_workdir": str(runs / "cls"), "eval.metrics": SAMPLE_METRICS,
               "eval.num_samples": 40, "eval.batch_size": 16, "eval.pixel_features": True}
  mesh = parallel.make_mesh(config_lib.base().mesh, jax.devices())
  assert eval_run.evaluate(str(runs / "model"), overrides=overrides, mesh=mesh,
                           max_batches=1) is None
  [partial] = [p for p in (runs / "model" / "eval").iterdir() if p.name.startswith("partial_4_")]
  [first] = partial.iterdir()   # one file per finished batch: samples 0..15
  assert first.name == "0000000000-0000000016.npz"
  before = (first.stat().st_mtime_ns, first.stat().st_ino, first.read_bytes())
  assert eval_run.evaluate(str(runs / "model"), overrides=overrides, mesh=mesh,
                           max_batches=1) is None
  # Resumed after batch 1; batch 2 is appended, batch 1 is not rewritten.
  assert sorted(p.name for p in partial.iterdir()) == ["0000000000-0000000016.npz",
                                                      "0000000016-0000000032.npz"]
  assert (first.stat().st_mtime_ns, first.stat().st_ino, first.read_bytes()) == before
  res = eval_run.evaluate(str(runs / "model"), overrides=overrides, mesh=mesh)
  assert not partial.exists()
  for k, v in ref.items():
    if k.startswith("bpd") or k.startswith("likelihood"):
      continue  # (not recomputed here: a per-example vmap, device-independent by construction)
    if isinstance(v, float):
      np.testing.assert_allclose(res[k], v, rtol=1e-3, atol=1e-5, err_msg=k)
    else:
      assert res[k] == v, k


def test_overrides_touch_only_eval_and_sample():
  config = config_lib.base()
  c = eval_run.with_overrides(config, {"eval.metrics": ["fd", "kid"], "sample.sampler": "heun",
                                       "sample.ddim.eta": 0.5, "eval.num_samples": 40})
  assert (c.eval.metrics, c.sample.sampler, c.sample.ddim.eta) == (("fd", "kid"), "heun", 0.5)
  assert c.eval.num_samples == 40 and config.eval.num_samples == 1000  # a copy
  c = eval_run.with_overrides(config, {"eval.metrics": ("fd,kid", "pr")})  # as the CLI gives
  assert eval_run.metric_names(c) == ("fd", "kid", "pr")
  for bad, message in (({"model.channels": 4}, "config.model.channels"),
                       ({"eval": 1}, "config.eval"),
                       ({"eval.bogus": 1}, "config.eval.bogus: no such config key"),
                       ({"eval.num_samples": "many"}, "config.eval.num_samples"),
                       ({"eval.num_samples": 0}, "config.eval.num_samples"),
                       ({"sample.sampler": "nope"}, "config.sample.sampler")):
    with pytest.raises(ValueError, match=message):
      eval_run.with_overrides(config, bad)
  with pytest.raises(ValueError, match="unknown metrics \\['bogus'\\]"):
    eval_run.metric_names(eval_run.with_overrides(config, {"eval.metrics": ("fd,bogus",)}))


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
  kw = {"eval.num_samples": 16, "eval.batch_size": 16, "eval.reference_split": "test[:24]",
        "eval.floor_split": "train[:24]", "eval.inception_weights": str(weights),
        "eval.ref_stats_dir": str(tmp_path / "stats")}
  res = eval_run.evaluate(str(runs / "model"), overrides={
      **kw, "eval.feature_workdir": str(runs / "cls"),
      "eval.metrics": ("fd", "kid", "pr", "is", "acc")})
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
  only = {**kw, "eval.feature_workdir": None}
  again = eval_run.evaluate(str(runs / "model"), overrides={**only, "eval.metrics": ("fd",)})
  np.testing.assert_allclose(again["fd_inception"], res["fd_inception"], rtol=1e-6)
  with pytest.raises(ValueError, match=f"{stats.name} holds only mu and sigma"):
    eval_run.evaluate(str(runs / "model"), overrides={**only, "eval.metrics": ("kid",)})


@pytest.mark.slow  # bounds vs closed forms by default: tests/evaluation/test_reconstruction.py
def test_vae_run_through_the_command(runs, data_dir):
  """A short class-conditional VAE run (configs/digits_vae.py: discretised-logistic
  decoder, so its bound is of the 8-bit values) evaluated by diffusion-jax-evaluate:
  its samples take the sample metrics through its generator (domain FD, accuracy), its
  bound gives bpd_elbo ≥ bpd_iwae, equal to −bound/(D ln 2) of `Bound.log_bounds`
  called here with image i's key fold_in(key(seed), i), and its autoencoder gives
  psnr/ssim equal to `metrics.psnr`/`ssim` of decode(encode(x).mean)."""
  w = runs / "vae"
  run_train_in_process([f"--config={os.path.join(ROOT, 'configs', 'digits_vae.py')}",
                        f"--workdir={w}", f"--config.data.data_dir={data_dir}",
                        "--config.vae.width=32", "--config.model.class_conditional=True",
                        "--config.data.batch_size=32", "--config.train.num_steps=10",
                        "--config.train.checkpoint_every=10", "--config.train.log_every=5",
                        "--config.optim.warmup_steps=2", "--config.train.sample_every=0"])
  n, k = 20, 4
  proc = run_cli("evaluate", [
      f"--workdir={w}", f"--config.eval.feature_workdir={runs / 'cls'}",
      "--config.eval.metrics=fd,acc,bpd_elbo,bpd_iwae,psnr,ssim,rfd",
      "--config.eval.num_samples=40", "--config.eval.batch_size=16",
      f"--config.eval.likelihood_images={n}", f"--config.eval.iwae_samples={k}"])
  res = json.loads(proc.stdout)
  assert res == json.loads((w / "eval" / "10.json").read_text())
  for key in ("fd_domain", "acc_domain", "rfd_domain", "bpd_elbo_stderr", "ssim"):
    assert np.isfinite(res[key]), key
  assert res["bpd_elbo"] >= res["bpd_iwae"] > 0 and res["rfd_domain"] >= 0
  assert (res["likelihood_images"], res["iwae_samples"], res["reconstruction_images"]) == (n, k, 40)

  comp = runs_lib.load(str(w))
  task = tasks.make(comp.config, comp.info)
  assert task.bound.discrete
  images, labels = data.load_arrays("sklearn_digits", "test", data_dir)
  seed, dims = comp.config.eval.seed, images[0].size
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(np.arange(n))
  nats = jax.jit(task.bound.log_bounds, static_argnums=4)(comp.params, images[:n], labels[:n],
                                                          keys, k)
  for m in ("elbo", "iwae"):
    bpd = -np.asarray(nats[m], np.float64) / (dims * np.log(2))
    np.testing.assert_allclose(res[f"bpd_{m}"], bpd.mean(), rtol=1e-4, err_msg=m)
  ae = task.autoencoder
  x_hat = np.asarray(jax.jit(lambda p, x, y: ae.decode(p, ae.encode(p, x, y)[0], y))(
      comp.params, images[:40], labels[:40]))
  np.testing.assert_allclose(res["psnr"], metrics_lib.psnr(images[:40], x_hat).mean(), rtol=1e-4)
  np.testing.assert_allclose(res["ssim"], metrics_lib.ssim(images[:40], x_hat).mean(), rtol=1e-4)
