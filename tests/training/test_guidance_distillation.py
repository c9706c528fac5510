"""Guidance distillation (Meng et al. 2023, stage one): the student's target is exactly
the teacher's classifier-free-guidance combination, a fresh student is exactly the
teacher's conditional model for every w, the plain networks keep their parameters, and
the task trains, resumes exactly and samples at one network call per step through the
real command line — and is the teacher of stage two (progressive distillation)."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (ROOT, TINY_FLAGS, assert_trees_equal, distill_config, load_state,
                      run_cli, run_train_in_process, tiny_config)
from diffusion_jax import runs
from diffusion_jax.diffusion import paths
from diffusion_jax.training import loop, tasks
from diffusion_jax.training.tasks import distill, guidance_distillation as gd

CONFIG = os.path.join(ROOT, "configs", "digits_guidance_distillation.py")
STAGE_TWO = os.path.join(ROOT, "configs", "digits_guided_progressive.py")


def _student(data_dir, teacher, **overrides):
  return distill_config(data_dir, teacher, "guidance_distillation",
                        **{"model.guidance_input": True, **overrides})


@functools.cache
def _made(data_dir, teacher):
  """(config, task, initial state, teacher Denoiser, teacher parameters)."""
  c = _student(data_dir, teacher)
  task = gd.make(c, loop.dataset_info(c))
  state = jax.jit(task.init)(jax.random.key(0))
  den, net = distill.teacher(c)
  return c, task, state, den, jax.tree.map(jnp.asarray, net)


def _inputs(B=6):
  k = jax.random.split(jax.random.key(3), 2)
  x = jax.random.normal(k[0], (B, 8, 8, 1))
  t = jax.random.uniform(k[1], (B,), minval=0.05, maxval=0.95)
  labels = jnp.array([0, 3, 9, 10, 5, 10])[:B]  # 10 = ∅
  w = jnp.array([0.0, 1.0, 2.5, 3.0, 4.0, 0.7])[:B]
  return x, t, labels, w


def test_target_is_the_teachers_cfg_combination(data_dir, tiny_teacher):
  """target(x_t, t, y, w) = (1 + w)·f(x_t, t, y) − w·f(x_t, t, ∅), exactly, with the two
  teacher calls made here separately; for y = ∅ it is f(x_t, t, ∅) whatever w. (The
  target evaluates f once on the stacked [x_t; x_t]; XLA:CPU's results depend on the
  batch size in the last bits, so the exact comparison calls f at that size, 2B, and
  B-sized calls agree to 1e-5.)"""
  _, _, _, den, net = _made(data_dir, tiny_teacher)
  rng = np.random.default_rng(0)  # the tiny teacher's classes barely differ yet: perturbed
  net = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), net)
  x, t, labels, w = _inputs()
  target = jax.jit(lambda n, x, t, y, w: gd.target(den, n, x, t, y, {}, w))(net, x, t, labels, w)
  f = jax.jit(lambda n, x, t, y: den.apply(n, x, t, y, {}))
  null = jnp.full_like(labels, den.null)
  xx, tt = jnp.concatenate([x, x]), jnp.concatenate([t, t])
  cond = f(net, xx, tt, jnp.concatenate([labels, labels]))[:6]
  uncond = f(net, xx, tt, jnp.concatenate([null, null]))[6:]
  assert float(jnp.max(jnp.abs(cond[:3] - uncond[:3]))) > 1e-3  # the combination matters
  wb = jnp.where(labels == den.null, 0.0, w)[:, None, None, None]
  np.testing.assert_array_equal(target, (1 + wb) * cond - wb * uncond)
  np.testing.assert_array_equal(target[labels == den.null], uncond[labels == den.null])
  cond_b, uncond_b = f(net, x, t, labels), f(net, x, t, null)
  np.testing.assert_allclose(target, (1 + wb) * cond_b - wb * uncond_b, atol=1e-5)


def test_examples_draw_w_uniformly_and_drop_labels_as_the_teacher_trained(data_dir,
                                                                         tiny_teacher):
  c = _student(data_dir, tiny_teacher, **{"guidance_distillation.w_min": 0.5,
                                         "guidance_distillation.w_max": 3.0})
  n = 4000
  keys = jax.random.split(jax.random.key(1), n)
  t, x_t, labels, w = jax.jit(lambda x, y, k: gd.examples(
      c, paths.from_config(c.diffusion), 10, x, y, k))(
          jnp.zeros((n, 8, 8, 1)), jnp.full((n,), 3), keys)
  assert 0.5 <= float(w.min()) and float(w.max()) <= 3.0
  assert abs(float(w.mean()) - 1.75) < 0.05 and abs(float(w.var()) - 2.5 ** 2 / 12) < 0.03
  assert abs(float(jnp.mean(labels == 10)) - c.diffusion.label_dropout) < 0.015
  assert set(np.unique(labels).tolist()) == {3, 10}
  assert abs(float(jnp.corrcoef(w, t)[0, 1])) < 0.05  # independent draws
  assert x_t.shape == (n, 8, 8, 1)


def test_fresh_student_is_the_teachers_conditional_model_for_every_w(data_dir, tiny_teacher):
  """Every teacher parameter is copied; the only new ones are the w embedding, whose
  last layer is zero: the student's prediction is bitwise the teacher's conditional
  (no-CFG) prediction for any w. The plain network (guidance_input=False) has no such
  parameters: the diffusion task's tree is the teacher checkpoint's."""
  c, task, state, den, net = _made(data_dir, tiny_teacher)
  student = state.params["student"]
  assert set(state.params) == {"student", "teacher"} and set(state.ema_params) == {"student"}
  assert set(student) - set(net) == {"guidance_embedder"} and set(net) <= set(student)
  assert_trees_equal({k: student[k] for k in net}, net)
  assert_trees_equal(state.params["teacher"], net)
  fc2 = student["guidance_embedder"]["fc2"]
  assert not np.any(np.asarray(fc2["kernel"])) and not np.any(np.asarray(fc2["bias"]))
  plain = tasks.make(tiny_config(c.data.data_dir), loop.dataset_info(c))
  shapes = jax.eval_shape(plain.init, jax.random.key(0)).params
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, net)
  assert not any("guidance" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0])

  x, t, labels, _ = _inputs()
  sden = task.denoiser
  assert sden.guidance_input and not den.guidance_input
  f_s = jax.jit(lambda p, x, t, y, w: sden.apply(sden.network(p), x, t, y, {}, guidance=w))
  ref = jax.jit(lambda n, x, t, y: den.apply(n, x, t, y, {}))(net, x, t, labels)
  for w in (0.0, 1.0, 2.7, 4.0):
    np.testing.assert_array_equal(f_s(state.params, x, t, labels, jnp.full((6,), w)), ref)


def test_merge_keeps_the_teachers_values_and_names_misfits():
  teacher = {"a": {"kernel": np.ones((2, 3))}, "b": np.zeros(4)}
  fresh = {"a": {"kernel": jnp.zeros((2, 3))}, "b": jnp.ones(4),
           "guidance_embedder": {"fc2": {"kernel": jnp.zeros((5, 5))}}}
  merged = gd.merge_params(teacher, fresh)
  assert_trees_equal(merged, {"a": {"kernel": np.ones((2, 3))}, "b": np.zeros(4),
                              "guidance_embedder": {"fc2": {"kernel": np.zeros((5, 5))}}})
  with pytest.raises(ValueError, match=r"a/kernel: the teacher's \(2, 3\), the student's \(3, 3\)"):
    gd.merge_params(teacher, dict(fresh, a={"kernel": jnp.zeros((3, 3))}))
  with pytest.raises(ValueError, match="b: the teacher has it, the student does not"):
    gd.merge_params(teacher, {"a": fresh["a"]})


def test_bad_settings_name_the_key(data_dir, tiny_teacher, tmp_path):
  info = loop.dataset_info(_student(data_dir, tiny_teacher))
  with pytest.raises(ValueError, match="config.model.guidance_input=True"):
    gd.make(_student(data_dir, tiny_teacher, **{"model.guidance_input": False}), info)
  with pytest.raises(ValueError, match="config.guidance_distillation.w_min=3.0 must be <="):
    gd.make(_student(data_dir, tiny_teacher, **{"guidance_distillation.w_min": 3.0,
                                               "guidance_distillation.w_max": 1.0}), info)
  with pytest.raises(ValueError, match="config.distill.guidance=2.0"):
    gd.make(_student(data_dir, tiny_teacher, **{"distill.guidance": 2.0}), info)
  with pytest.raises(ValueError, match="config.distill.teacher"):
    loop.train(_student(data_dir, ""), str(tmp_path / "none"))
  with pytest.raises(ValueError, match="model.channels: teacher has 8, this run has 16"):
    loop.train(_student(data_dir, tiny_teacher, **{"model.channels": 16}), str(tmp_path / "m"))
  # a plain diffusion run cannot train a w-input network (no w in the denoising loss)
  with pytest.raises(ValueError, match="config.model.guidance_input=True: the denoising loss"):
    loop.train(tiny_config(data_dir, **{"model.guidance_input": True,
                                        "train.num_steps": 1}), str(tmp_path / "d"))


def _args(data_dir, teacher, workdir, *extra):
  return [f"--config={CONFIG}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          *TINY_FLAGS, f"--config.distill.teacher={teacher}", "--config.sample.per_class=0",
          "--config.train.checkpoint_every=2", *extra]


def _sample(workdir, guidance, steps=4, params="ema"):
  """(images [10, 8, 8, 1], NFE) of a run's student (its EMA or raw parameters), in
  this process."""
  comp = runs.load(workdir, params=params)
  gen = tasks.make(comp.config, comp.info).generator
  cond = gen.conditioning(np.arange(10, dtype=np.int32) % 10)
  fn = jax.jit(gen.sample(guidance=guidance, num_steps=steps))
  x, nfe = fn(comp.params, cond, jax.random.split(jax.random.key(0), 10))
  return np.asarray(x), int(nfe)


@pytest.fixture(scope="module")
def student_run(data_dir, tiny_teacher, tmp_path_factory):
  """A 4-step guidance-distillation run of the tiny teacher through the command line
  (configs/digits_guidance_distillation.py at the tiny size)."""
  workdir = tmp_path_factory.mktemp("guided") / "whole"
  run_train_in_process(_args(data_dir, tiny_teacher, workdir, "--config.train.num_steps=4"))
  return workdir


def test_samples_at_any_w_with_one_call_per_step(data_dir, tiny_teacher, student_run,
                                                 tmp_path):
  """diffusion-jax-sample --guidance=2 --steps=4: 4 network calls (the teacher's CFG at
  the same sampler and steps: 8), finite, the student's own samples; w matters."""
  params, _ = load_state(student_run)
  assert_trees_equal(params["teacher"], runs.load(tiny_teacher).params)  # frozen
  assert np.any(np.asarray(params["student"]["guidance_embedder"]["fc2"]["kernel"]))
  out = str(tmp_path / "w2.npz")
  run_cli("sample", [f"--workdir={student_run}", f"--output={out}", "--num_samples=10",
                     "--guidance=2", "--steps=4"])
  cli = np.load(out)["values"]
  x2, nfe = _sample(str(student_run), 2.0)
  assert nfe == 4 and _sample(tiny_teacher, 2.0)[1] == 8
  assert np.all(np.isfinite(cli)) and cli.shape == (10, 8, 8, 1)
  np.testing.assert_allclose(cli, x2, atol=1e-4)  # the command line samples that student
  # w is an input that matters: the trained parameters' samples differ across w (4 steps
  # on the tiny teacher, whose classes barely differ, move them by ~1e-6)
  assert not np.array_equal(_sample(str(student_run), 2.0, params="raw")[0],
                            _sample(str(student_run), 0.0, params="raw")[0])
  # guidance distillation needs a CFG teacher, not a w-input one
  proc = run_train_in_process(_args(data_dir, student_run, tmp_path / "again",
                                    "--config.train.num_steps=1"), check=False)
  assert proc.returncode != 0 and "already takes w as an input" in proc.stderr


@pytest.mark.slow  # ~23 s; progressive distillation is test_progressive.py's (default)
def test_stage_two_progressive_distillation_from_the_student(data_dir, student_run, tmp_path):
  """Meng et al. §4.2: progressive distillation (configs/digits_guided_progressive.py)
  with the w-input student as its teacher trains, keeps the w input and samples at any
  w in its own N = 2 DDIM steps (NFE 2)."""
  stage2 = tmp_path / "stage2"
  run_train_in_process([f"--config={STAGE_TWO}", f"--workdir={stage2}",
                        f"--config.data.data_dir={data_dir}", *TINY_FLAGS,
                        "--config.sample.num_steps=2", "--config.sample.per_class=0",
                        f"--config.distill.teacher={student_run}",
                        "--config.train.num_steps=2", "--config.train.checkpoint_every=2"])
  config = runs.read(str(stage2))[0]
  assert config.model.guidance_input and config.distill.teacher == str(student_run)
  params, _ = load_state(stage2)
  assert "guidance_embedder" in params["student"]
  y1, nfe = _sample(str(stage2), 1.0, steps=2, params="raw")
  y3, _ = _sample(str(stage2), 3.0, steps=2, params="raw")
  assert nfe == 2 and np.all(np.isfinite(y1)) and not np.array_equal(y1, y3)


@pytest.mark.slow  # two more runs (~25 s); the distillation state's resume is also progressive's
def test_resume_is_exact_through_the_command_line(data_dir, tiny_teacher, student_run,
                                                  tmp_path):
  part = tmp_path / "part"
  run_train_in_process(_args(data_dir, tiny_teacher, part, "--config.train.num_steps=2"))
  run_train_in_process(_args(data_dir, tiny_teacher, part, "--config.train.num_steps=4"))
  assert_trees_equal(load_state(part), load_state(student_run))  # 2 + 2 == 4, bitwise
