"""The gan task through the real loop: state layout, 8 devices == 1 device, resume ==
uninterrupted, the non-finite guard, sampling and interpolation through the command
line, and (-m slow) the measured results: ring-of-8 mode coverage and a conditional
DCGAN on mnist5k recognised by the domain classifier."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (ROOT, assert_trees_equal, read_metrics, run_cli, run_train_in_process,
                      tiny_config)
from diffusion_jax import data
from diffusion_jax.evaluation import metrics as metrics_lib
from diffusion_jax import runs
from diffusion_jax.training import loop, step as step_lib
from diffusion_jax.training.tasks import gan as gan_task


def _tiny_gan(data_dir, **overrides):
  """A conditional DCGAN on the 8×8 digits, small enough to compile in seconds; two
  discriminator updates per step (interleaved halves of the batch)."""
  return tiny_config(data_dir, **{
      "task": "gan", "gan.generator": "dcgan", "gan.discriminator": "dcgan",
      "gan.channels": 8, "gan.latent_dim": 8, "gan.d_steps": 2, "model.class_conditional": True,
      "optim.name": "adam", "optim.lr": 2e-3, "optim.b1": 0.5, "optim.schedule": "constant",
      "optim.warmup_steps": 0, "train.num_steps": 4, "train.checkpoint_every": 2,
      "sample.per_class": 1, **overrides})


def _params(state):
  return jax.device_get((state.params, state.ema_params, state.opt_state))


def test_eight_devices_equal_one_and_resume_is_exact(data_dir, tmp_path):
  """4 steps on 1 device and on 8 (BatchNorm over the global batch under jit: the same
  statistics); 2 steps then a resumed 2 more equal 4 uninterrupted, bitwise."""
  c = _tiny_gan(data_dir)
  one = loop.train(c, str(tmp_path / "one"), devices=jax.devices()[:1])
  eight = loop.train(c, str(tmp_path / "eight"))
  assert_trees_equal(_params(one), _params(eight), rtol=2e-5, atol=1e-6)
  half = _tiny_gan(data_dir, **{"train.num_steps": 2})
  loop.train(half, str(tmp_path / "resumed"))
  resumed = loop.train(c, str(tmp_path / "resumed"))
  assert_trees_equal(_params(resumed), _params(eight))

  # The two-player layout of the one TrainState, and what the loop logged and drew.
  params, ema, opt = _params(eight)
  assert set(params) == {"generator", "discriminator"} and set(ema) == {"generator"}
  assert set(params["generator"]) == {"params", "batch_stats"}  # DCGAN G: BatchNorm
  assert set(opt) == {"generator", "discriminator"}
  assert_trees_equal(ema["generator"]["batch_stats"], params["generator"]["batch_stats"])
  m = read_metrics(tmp_path / "eight")
  assert {"d_loss", "g_loss", "d_real", "d_fake", "grad_norm_d", "grad_norm_g"} <= set(m[-1])
  assert all(r["nonfinite"] == 0 for r in m)
  assert os.listdir(tmp_path / "eight" / "samples") == ["step_0000004.png"]


def test_nonfinite_step_keeps_both_players(data_dir):
  """A NaN in the batch: neither player, nor EMA, nor optimizer state changes."""
  c = _tiny_gan(data_dir)
  task = gan_task.make(c, loop.dataset_info(c))
  state = jax.jit(task.init)(jax.random.key(0))
  batch = next(data.make_train_iterator(c.data, seed=0))
  step = jax.jit(step_lib.make_train_step(task))
  good, m = step(state, batch, jax.random.key(1))
  assert int(m["nonfinite"]) == 0
  bad_batch = dict(batch, image=np.full_like(batch["image"], np.nan))
  after, m = step(good, bad_batch, jax.random.key(2))
  assert int(m["nonfinite"]) == 1 and int(after.step) == 2
  assert_trees_equal(_params(after), _params(good))


def test_d_steps_must_divide_the_batch(data_dir):
  c = _tiny_gan(data_dir, **{"gan.d_steps": 3})
  with pytest.raises(ValueError, match="config.gan.d_steps=3"):
    gan_task.make(c, loop.dataset_info(c))
  # A per-device slice that the updates cannot split (batch 16 over 4 devices, 3 updates
  # of the discriminator) is refused by the generic step, naming the player.
  c = _tiny_gan(data_dir, **{"gan.d_steps": 2})
  task = gan_task.make(c, loop.dataset_info(c))
  state = jax.eval_shape(task.init, jax.random.key(0))
  batch = {"image": jnp.zeros((3, 8, 8, 1)), "label": jnp.zeros((3,), jnp.int32)}
  with pytest.raises(ValueError, match="player 'discriminator'"):
    jax.eval_shape(step_lib.make_train_step(task), state, batch, jax.random.key(0))


def test_mode_coverage_on_hand_built_samples():
  """8 modes: 300 exact-centre samples for 6 modes, 19 for the 7th (below the 20 needed),
  none for the 8th, plus 100 far-off samples."""
  centres = data.builders.ring8_centers()
  pts = np.concatenate([np.repeat(centres[:6], 300, 0), np.repeat(centres[6:7], 19, 0),
                        np.zeros((100, 2))])
  r = metrics_lib.mode_coverage(pts, centres, std=0.02)
  assert r["modes"] == 6 and r["counts"] == [300] * 6 + [19, 0]
  assert r["high_quality"] == pytest.approx(1819 / 1919)
  p = np.array([300] * 6 + [19, 0]) / 1819
  assert r["kl"] == pytest.approx(np.sum(p[p > 0] * np.log(8 * p[p > 0])))


def test_slerp_and_linear_interpolation():
  z0, z1 = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 2.0]])
  # Ω = π/2: both weights are sin(π/4) / sin(π/2) (White 2016's formula, unnormalised).
  np.testing.assert_allclose(gan_task.slerp(z0, z1, 0.5), np.sqrt(0.5) * (z0 + z1), rtol=1e-6)
  # On the unit circle it walks the arc at constant speed: the angle is s·Ω.
  arc = gan_task.slerp(z0, z1 / 2, 0.3)
  np.testing.assert_allclose(np.arctan2(arc[0, 1], arc[0, 0]), 0.3 * np.pi / 2, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(arc), 1.0, rtol=1e-6)
  np.testing.assert_allclose(gan_task.slerp(z0, z1, 0.0), z0, atol=1e-7)
  np.testing.assert_allclose(gan_task.slerp(z0, z1, 1.0), z1, atol=1e-6)
  np.testing.assert_allclose(gan_task.slerp(z0, 3 * z0, 0.5), 2 * z0, rtol=1e-6)  # parallel


def test_train_sample_and_interpolate_through_the_command_line(data_dir, tmp_path):
  """configs/gan_digits.py (small) trained by diffusion-jax-train's entry point (in this
  process, 1 device), then diffusion-jax-sample (separate processes) with labels (the requested labels written back, float values beside uint8), and linear /
  slerp interpolation strips whose end points are the generator at z0 and z1; diffusion
  sampler options are refused by name (in process)."""
  w = tmp_path / "run"
  run_train_in_process([f"--config={os.path.join(ROOT, 'configs', 'gan_digits.py')}",
                        f"--workdir={w}", f"--config.data.data_dir={data_dir}",
                        "--config.gan.channels=8", "--config.gan.latent_dim=8",
                        "--config.data.batch_size=16", "--config.train.num_steps=3",
                        "--config.train.log_every=1", "--config.sample.per_class=2"])
  assert os.listdir(w / "samples") == ["step_0000003.png"]
  out = tmp_path / "s.npz"
  run_cli("sample", [f"--workdir={w}", "--num_samples=6", "--labels=3,7", f"--output={out}",
                     "--grid"])
  with np.load(out) as f:
    assert f["images"].shape == (6, 8, 8, 1) and f["labels"].tolist() == [3, 7] * 3
    assert f["values"].min() >= -1 and f["values"].max() <= 1  # tanh output
    first = f["images"]
  assert (tmp_path / "s.png").exists() and first.std() > 0
  strips = {}
  for method in ("linear", "slerp"):
    o = tmp_path / f"{method}.npz"
    run_cli("sample", [f"--workdir={w}", "--num_samples=2", "--labels=1", f"--output={o}",
                       f"--interpolate={method}", "--interpolation_points=5", "--grid"])
    with np.load(o) as f:
      strips[method] = f["images"]
    assert strips[method].shape == (2, 5, 8, 8, 1) and (tmp_path / f"{method}.png").exists()
  # Both strips start at G(z0) and end at G(z1); in between they differ.
  np.testing.assert_array_equal(strips["linear"][:, [0, -1]], strips["slerp"][:, [0, -1]])
  assert not np.array_equal(strips["linear"][:, 2], strips["slerp"][:, 2])
  comp = runs.load(str(w))
  generator = gan_task.make(comp.config, comp.info).generator
  for bad in (dict(sampler="ddim"), dict(num_steps=7), dict(guidance=2.0), dict(strength=0.5)):
    with pytest.raises(ValueError, match="config.task='gan'"):
      generator.sample(**bad)


@pytest.mark.slow
def test_ring8_covers_the_modes(data_dir, tmp_path):
  """configs/gan_ring8.py through the command line: of 2,500 samples of the EMA
  generator, at least 7 of 8 modes have ≥ 20 samples within 3σ of their centre, and
  most samples are that close to a mode (docs/gan.md has the measured numbers)."""
  run_cli("train", [f"--config={os.path.join(ROOT, 'configs', 'gan_ring8.py')}",
                    f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}"],
          timeout=1200)
  out = run_cli("gan_modes", [f"--workdir={tmp_path}"]).stdout.strip().splitlines()[-1]
  r = json.loads(out)
  print("\nring8:", out)
  assert r["num_samples"] == 2500 and r["step"] == 5000 and sum(r["counts"]) <= 2500
  assert r["modes"] >= 7 and r["high_quality"] > 0.5, r


@pytest.mark.parametrize("variant", [
    {"gan.generator": "stylegan", "gan.d_norm": "layer", "gan.loss": "hinge"},
    {"gan.discriminator": "patchgan", "gan.patch_layers": 1, "gan.loss": "lsgan",
     "model.class_conditional": False},
    {"gan.generator": "mlp", "gan.discriminator": "mlp", "gan.d_norm": "none",
     "gan.loss": "wgan", "gan.gp_weight": 10.0},
    {"gan.d_norm": "none", "gan.loss": "minimax", "gan.r1_weight": 1.0, "gan.d_steps": 1},
], ids=["stylegan-hinge", "patchgan-lsgan", "mlp-wgan_gp", "dcgan-minimax-r1"])
def test_every_network_and_loss_trains_a_step(data_dir, variant):
  """Each generator, discriminator, loss and penalty through the task's real step: finite
  losses, both players updated, the penalties on (> 0) where configured."""
  c = _tiny_gan(data_dir, **{"gan.style_dim": 16, "gan.mapping_depth": 2,
                             "gan.mlp_width": 32, "gan.mlp_depth": 2, **variant})
  info = loop.dataset_info(c)
  task = gan_task.make(c, info)
  state = jax.jit(task.init)(jax.random.key(0))
  batch = next(data.make_train_iterator(c.data, seed=0))
  new, m = jax.jit(step_lib.make_train_step(task))(state, batch, jax.random.key(1))
  m = jax.device_get(m)
  assert int(m["nonfinite"]) == 0 and all(np.isfinite(float(v)) for v in m.values()), m
  for player in ("generator", "discriminator"):
    before, after = (jax.device_get(s.params[player]["params"]) for s in (state, new))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(after))), player
  assert (float(m["gp"]) > 0) == bool(c.gan.gp_weight)
  assert (float(m["r1"]) > 0) == bool(c.gan.r1_weight)
  x, nfe = jax.jit(task.generator.sample())(new.ema_params, {"label": jnp.arange(4) % 10},
                                             jax.random.split(jax.random.key(2), 4))
  assert x.shape == (4,) + tuple(info.image_shape) and nfe == 1


def test_config_errors_name_the_key(data_dir):
  from diffusion_jax import config as config_lib
  c = _tiny_gan(data_dir, **{"gan.r1_weight": 1.0})  # d_norm='batch'
  config_lib.validate(c)
  info = loop.dataset_info(c)
  with pytest.raises(ValueError, match="config.gan.d_norm='batch'"):
    gan_task.make(c, info)
  c = _tiny_gan(data_dir, **{"gan.discriminator": "patchgan"})  # conditional
  with pytest.raises(ValueError, match="config.gan.discriminator"):
    gan_task.make(c, info)


def test_pmap_step_equals_jit_step_without_batchnorm(data_dir):
  """The pmap path (8 devices, 2 examples each, gradients averaged by lax.pmean) gives
  the jit step's update for BatchNorm-free networks (WGAN-GP, two critic updates); with
  BatchNorm it is refused by name (per-device statistics would differ)."""
  from diffusion_jax import parallel
  c = _tiny_gan(data_dir, **{"gan.generator": "mlp", "gan.discriminator": "mlp",
                             "gan.d_norm": "none", "gan.mlp_width": 16, "gan.mlp_depth": 1,
                             "gan.loss": "wgan", "gan.gp_weight": 10.0,
                             "optim.name": "sgd", "optim.lr": 0.1})
  info = loop.dataset_info(c)
  task = gan_task.make(c, info)
  state = jax.device_get(jax.jit(task.init)(jax.random.key(0)))
  batch = next(data.make_train_iterator(c.data, seed=0))
  body, key = step_lib.make_train_step(task), jax.random.key(3)
  want_state, want = jax.jit(body)(state, batch, key)
  got_state, got = parallel.pmap_step(body)(parallel.replicate(state),
                                            parallel.split_for_pmap(batch), key)
  for k in ("d_loss", "g_loss", "gp"):
    np.testing.assert_allclose(np.asarray(got[k]), np.full(8, want[k]), rtol=2e-5, atol=1e-6)
  assert_trees_equal(jax.device_get(parallel.unreplicate(got_state)).params,
                     jax.device_get(want_state.params), rtol=2e-5, atol=1e-6)
  bn = gan_task.make(_tiny_gan(data_dir), info)
  bn_state = jax.device_get(jax.jit(bn.init)(jax.random.key(0)))
  with pytest.raises(ValueError, match="pmap"):
    parallel.pmap_step(step_lib.make_train_step(bn))(
        parallel.replicate(bn_state), parallel.split_for_pmap(batch), key)


def _conditional_mnist5k_accuracy(data_dir, workdir, num_steps: int) -> dict:
  """configs/gan_mnist5k_cond.py trained through the command line for num_steps, then
  launch/class_accuracy.py's report (1,000 samples, labels 0..9 cycled)."""
  run_cli("train", [f"--config={os.path.join(ROOT, 'configs', 'gan_mnist5k_cond.py')}",
                    f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                    f"--config.train.num_steps={num_steps}"], timeout=1200, optimize=True)
  proc = run_cli("class_accuracy", [f"--workdir={workdir}"], timeout=600, optimize=True)
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  with open(os.path.join(workdir, "eval", f"class_accuracy_{num_steps}.json")) as f:
    assert json.load(f) == report
  return report


@pytest.mark.slow
def test_conditional_mnist5k_gan_is_recognised(data_dir, tmp_path):
  """The issue's acceptance run: a class-conditional DCGAN on mnist5k trained through the
  command line (the config's 3,000 steps; 6 min 39 s on the idle 2-core machine)
  generates digits that the domain classifier (an MLP on pixels, trained on the real
  train split) recognises as the requested class. Measured (2026-11-23): sample accuracy 0.948, per class 0.75–0.99,
  classifier test accuracy 0.936 (docs/gan.md)."""
  r = _conditional_mnist5k_accuracy(data_dir, tmp_path, 3000)
  print("\nmnist5k conditional GAN:", json.dumps(r))
  assert r["checkpoint_step"] == 3000 and r["num_samples"] == 1000
  assert r["classifier_test_accuracy"] > 0.9, r
  assert r["sample_accuracy"] > 0.85 and min(r["per_class"]) > 0.5, r
