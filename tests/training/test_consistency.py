"""The consistency task (Song et al. 2023; iCT, Song & Dhariwal 2023): the boundary
f_θ(x, t_min) = x holds exactly for the real network on several paths; CD and CT train
through the real command line with the shipped digits configs, resume exactly (the
target network included) and sample in 1 and 2 steps with `diffusion-jax-sample`; bad
settings are errors naming the key. (The mathematics, and convergence to the
closed-form consistency function: tests/diffusion/test_consistency_math.py.)"""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (ROOT, TINY_FLAGS, assert_trees_equal, distill_config, read_metrics,
                      run_cli, run_train_in_process, tiny_config)
from diffusion_jax import checkpoint, runs
from diffusion_jax.diffusion import paths, predictions
from diffusion_jax.training import loop
from diffusion_jax.training.tasks import consistency, distill


def _ct(data_dir, **overrides):
  """The tiny config as a consistency-training run (no teacher)."""
  return tiny_config(data_dir, **{"task": "consistency", "consistency.mode": "training",
                                  "distill.init": "random", "sample.sampler": "consistency",
                                  "sample.guidance": 0.0, "train.num_steps": 4, **overrides})


def test_boundary_is_exact_for_the_network_and_the_ct_loss_runs(data_dir):
  """The real (randomly initialised) tiny U-Net through the task's consistency function
  on the flow, vp_discrete and edm paths: f_θ(x, t_min) = x bitwise, under jit; f is
  finite at t = 1 (the flow path's a = 0); the run's Denoiser capability gives f_θ
  (x̂₀ = f), not the raw network. And the CT loss of iCT's settings (N(k) doubling,
  lognormal pairs, λ = 1/Δσ) is finite and follows N(k) at steps 0 and 1."""
  from diffusion_jax import data
  from diffusion_jax.training.tasks.base import StepContext
  extra = {"flow": {},
           "edm": {"diffusion.prediction": "edm", "diffusion.sigma_min": 0.002,
                   "diffusion.sigma_max": 80.0},
           "vp_discrete": {"diffusion.prediction": "eps"}}
  ict = {"consistency.schedule": "ict", "consistency.s0": 10, "consistency.s1": 40,
         "consistency.weighting": "ict", "consistency.time_sampling": "lognormal"}
  configs = {p: _ct(data_dir, **{"diffusion.path": p, **o, **ict}) for p, o in extra.items()}
  info = loop.dataset_info(configs["flow"])
  task = consistency.make(configs["flow"], info)
  params = jax.jit(task.init)(jax.random.key(0)).params  # the same network on every path
  assert set(params) == {"student"}           # CT, μ = 0: no teacher, no target
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)) * 2.0
  labels = jnp.arange(4, dtype=jnp.int32)
  fns, t_mins = {}, {}
  for name, c in configs.items():
    p = paths.from_config(c.diffusion)
    t_mins[name] = consistency.grids(c, p).t_min
    fns[name] = consistency.student_fn(distill.student(c, info).denoiser, p, t_mins[name], 0.5)

  @jax.jit
  def evaluate(net):
    out = {}
    for name, f in fns.items():
      fn = f(net, labels, {})
      out[name] = [fn(x, jnp.full((4,), t, jnp.float32)) for t in (t_mins[name], 0.5, 1.0)]
    pred = task.denoiser.apply(net, x, jnp.full((4,), 0.5), labels, {})
    return out, predictions.to_x0_eps(paths.from_config(configs["flow"].diffusion),
                                      "velocity", pred, x, jnp.full((4,), 0.5))[0]

  out, x0 = evaluate(params["student"])
  for name, (at_min, mid, top) in out.items():
    np.testing.assert_array_equal(at_min, x, err_msg=name)
    assert np.all(np.isfinite(top)) and not np.allclose(mid, x), name
  np.testing.assert_allclose(x0, out["flow"][1], rtol=1e-4, atol=1e-4)

  batch = next(data.make_train_iterator(configs["flow"].data, seed=0))
  keys = jax.random.split(jax.random.key(2), batch["label"].shape[0])
  loss = jax.jit(lambda prm, k: task.players[0].loss(prm, batch, keys, StepContext(
      step=k, update=0, dropout_key=jax.random.key(3), axis_name=None, state=None)))
  for k, n in ((0, 11.0), (1, 21.0)):  # K = 4: K' = ⌊4/(⌊log₂ 4⌋ + 1)⌋ = 1
    value, (metrics, _) = loss(params, jnp.int32(k))
    assert np.isfinite(value) and float(metrics["num_scales"]) == n


def _state(workdir, step):
  """The whole saved TrainState of a checkpoint (params, EMA, optimizer state) as numpy."""
  mngr = checkpoint.manager(str(workdir), read_only=True)
  try:
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  finally:
    mngr.close()
  return jax.tree.map(np.asarray, state)


def _train_resume_sample(tmp_path, args, entries):
  """4 steps in one run (checkpoints at 2, 3 and 4) == a copy cut back to step 2 and
  resumed, bitwise over the whole state; then 1- and 2-step samples of the run through
  `diffusion-jax-sample`. Returns the uninterrupted run's metrics."""
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  common = [*args, "--config.train.num_steps=4", "--config.train.checkpoint_every=1",
            "--config.train.keep_checkpoints=3"]
  run_train_in_process([*common, f"--workdir={whole}"])
  shutil.copytree(whole, cut)
  for step in ("3", "4"):
    shutil.rmtree(cut / "checkpoints" / step)
  run_train_in_process([*common, f"--workdir={cut}"])
  a, b = _state(whole, 4), _state(cut, 4)
  assert set(a["params"]) == entries and set(a["ema_params"]) == {"student"}
  assert_trees_equal(a, b)
  for steps in (1, 2):
    out = tmp_path / f"s{steps}.npz"
    run_cli("sample", [f"--workdir={whole}", f"--steps={steps}", "--num_samples=6",
                       f"--output={out}", "--labels=0,1,2"])
    images = np.load(out)["images"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
  return read_metrics(whole)


def test_distillation_trains_resumes_and_samples_through_the_command_line(
    data_dir, tiny_teacher, tmp_path):
  """configs/digits_consistency.py from the tiny teacher: the state holds the frozen
  teacher and the target EMA θ⁻ (μ = 0.95), both resumed bitwise; the teacher never
  moves; θ⁻ ← μ·θ⁻ + (1 − μ)·θ with θ the student as the step's loss saw it, i.e.
  before that step's optimizer update (checkpoints 3 → 4)."""
  args = [f"--config={os.path.join(ROOT, 'configs', 'digits_consistency.py')}",
          f"--config.data.data_dir={data_dir}", *TINY_FLAGS,
          f"--config.distill.teacher={tiny_teacher}", "--config.train.log_every=1"]
  metrics = _train_resume_sample(tmp_path, args, {"student", "teacher", "target"})
  assert all(np.isfinite(m["loss"]) and m["nonfinite"] == 0 for m in metrics)
  assert {m["num_scales"] for m in metrics} == {18.0}
  np.testing.assert_allclose([m["target_decay"] for m in metrics], 0.95, rtol=1e-6)
  teacher = runs.load(tiny_teacher).params
  final = _state(tmp_path / "whole", 4)["params"]
  assert_trees_equal(final["teacher"], teacher)
  before = _state(tmp_path / "whole", 3)["params"]
  expect = jax.tree.map(lambda p, q: 0.95 * p + 0.05 * q, before["target"], before["student"])
  assert_trees_equal(final["target"], expect, rtol=1e-6, atol=1e-8)
  moved = lambda x, y: any(not np.array_equal(u, v) for u, v in
                           zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  assert moved(final["target"], final["student"]) and moved(final["student"], teacher)


@pytest.mark.slow  # ~50 s; the default set runs the CT loss in-process (above) and CD here
def test_training_trains_resumes_and_samples_through_the_command_line(data_dir, tmp_path):
  """configs/digits_consistency_training.py (iCT: N(k) doubling, lognormal pairs,
  λ = 1/Δσ, θ⁻ = stopgrad θ) from scratch, without any teacher."""
  args = [f"--config={os.path.join(ROOT, 'configs', 'digits_consistency_training.py')}",
          f"--config.data.data_dir={data_dir}", *TINY_FLAGS, "--config.train.log_every=1",
          "--config.consistency.s1=40"]
  metrics = _train_resume_sample(tmp_path, args, {"student"})
  assert all(np.isfinite(m["loss"]) and m["nonfinite"] == 0 for m in metrics)
  # K = 4 steps: K' = ⌊4/(⌊log₂ 4⌋ + 1)⌋ = 1, N = 11, 21, 41, 41
  assert [m["num_scales"] for m in metrics[:4]] == [11.0, 21.0, 41.0, 41.0]


def test_bad_settings_name_the_key(data_dir, tiny_teacher, tmp_path):
  info = loop.dataset_info(_ct(data_dir))

  def refused(match, **overrides):
    with pytest.raises(ValueError, match=match):
      consistency.make(_ct(data_dir, **overrides), info)

  refused("config.sample.sampler='consistency'", **{"sample.sampler": "euler"})
  refused(r"config.consistency.target_decay=1.0", **{"consistency.target_decay": 1.0})
  refused(r"config.consistency.num_scales=1", **{"consistency.num_scales": 1})
  refused(r"config.consistency.s0=20, config.consistency.s1=10",
          **{"consistency.schedule": "ict", "consistency.s0": 20, "consistency.s1": 10})
  refused("config.consistency.lpips_weights", **{"consistency.distance": "lpips"})
  refused("config.consistency.distance=", **{"consistency.distance": "l3"})
  refused(r"config.consistency.num_scales: a grid of 18 points exceeds",
          **{"diffusion.path": "vp_discrete", "diffusion.num_steps": 10,
             "diffusion.prediction": "eps"})
  refused("config.consistency.sigma_min", **{"consistency.sigma_min": 100.0})
  refused("config.model.guidance_input", **{"model.guidance_input": True})
  with pytest.raises(ValueError, match="config.consistency.mode"):
    from diffusion_jax import config as config_lib
    config_lib.validate(_ct(data_dir, **{"consistency.mode": "both"}))
  cd = lambda **o: distill_config(data_dir, tiny_teacher, "consistency", **{
      "sample.sampler": "consistency", "sample.guidance": 0.0, "distill.guidance": 1.0,
      "train.num_steps": 2, **o})
  with pytest.raises(ValueError, match="config.sample.guidance=0"):
    loop.train(cd(**{"sample.guidance": 1.0}), str(tmp_path / "g"))
  with pytest.raises(ValueError, match="model.channels: teacher has 8, this run has 16"):
    loop.train(cd(**{"model.channels": 16}), str(tmp_path / "m"))
  with pytest.raises(ValueError, match="config.distill.teacher"):
    loop.train(cd(**{"distill.teacher": ""}), str(tmp_path / "none"))
