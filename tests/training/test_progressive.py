"""Progressive distillation (Salimans & Ho 2022): the target x̃ reproduces two teacher
DDIM steps exactly (the exact mixture denoiser as teacher), the teacher's DDIM steps are
the library's `ddim` sampler, a chain of students on Gaussian data converges to the
exact probability-flow map, and the task trains, resumes exactly and samples through
the real command line (the chain launcher included)."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (ROOT, TINY_FLAGS, assert_trees_equal, distill_config, run_cli,
                      run_train_in_process)
from diffusion_jax import samplers
from diffusion_jax.diffusion import paths, predictions
from diffusion_jax.training import loop
from diffusion_jax.training.tasks import progressive

sys.path.insert(0, os.path.join(ROOT, "tests", "samplers"))
import mixture  # noqa: E402

PATHS = [(paths.Path("flow"), "velocity"), (paths.Path("vp_discrete", 1000, "linear"), "eps")]


def _exact_x0(path, prediction):
  fn = mixture.model_fn(path, prediction)

  def x0(x, t):
    return predictions.to_x0_eps(path, prediction, fn(x, t, None), x, t)[0]
  return x0


@pytest.mark.parametrize("path,prediction", PATHS, ids=["flow", "vp_discrete"])
def test_target_reproduces_two_teacher_ddim_steps(path, prediction):
  """One student DDIM step from t with x̂₀ = x̃ lands exactly where the teacher's two
  DDIM steps t → t′ → t″ land, at every student step of an 8-step grid; and the
  teacher's steps composed over the grid are the `ddim` sampler."""
  x0_of = _exact_x0(path, prediction)
  n = 8
  grid = samplers.spacing.grid(path, 2 * n, "uniform")
  x1 = jax.random.normal(jax.random.key(0), (512, 2))
  x = x1
  for i in range(n):
    t, t1, t2 = (jnp.full((512,), grid[2 * i + j]) for j in range(3))
    x_t1 = progressive.ddim_step(path, x0_of(x, t), x, t, t1)
    x_t2 = progressive.ddim_step(path, x0_of(x_t1, t1), x_t1, t1, t2)
    if i < n - 1:
      x_tilde = progressive.target(path, x, x_t2, t, t2)
      np.testing.assert_allclose(progressive.ddim_step(path, x_tilde, x, t, t2), x_t2,
                                 atol=2e-5)
    x = x_t2
  den = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                               jnp.zeros(512, jnp.int32))
  ref, _ = samplers.ddim(den, path, x1, jax.random.split(jax.random.key(1), 512), 2 * n)
  np.testing.assert_allclose(x, ref, atol=2e-5)


def _affine_round(path, teacher, n, mu, s, key):
  """One round on Gaussian data N(mu, s²) in 1-D: fit, per student step i, the affine
  student x̂₀(x_t) = α_i·x_t + β_i to the progressive target by least squares (every
  DDIM step of an affine teacher is affine, so the fit is exact). `teacher(i2, x)` is
  the teacher's x̂₀ at its grid step i2 of 2n. Returns the student as the same kind of
  function over its grid of n steps."""
  grid = samplers.spacing.grid(path, 2 * n, "uniform")
  coefs = []
  for i in range(n):
    t, t1, t2 = (jnp.full((4096,), grid[2 * i + j]) for j in range(3))
    k1, k2, key = jax.random.split(key, 3)
    x = mu + s * jax.random.normal(k1, (4096, 1))
    a, b = path.ab(t[0])
    x_t = a * x + b * jax.random.normal(k2, (4096, 1))
    x_t1 = progressive.ddim_step(path, teacher(2 * i, x_t), x_t, t, t1)
    x_t2 = progressive.ddim_step(path, teacher(2 * i + 1, x_t1), x_t1, t1, t2)
    x_tilde = jnp.where(grid[2 * i + 2] > 0, progressive.target(path, x_t, x_t2, t, t2), x_t2)
    A = np.concatenate([np.asarray(x_t), np.ones((4096, 1))], 1)
    coefs.append(np.linalg.lstsq(A, np.asarray(x_tilde), rcond=None)[0][:, 0])
  return lambda i, x: coefs[i][0] * x + coefs[i][1]


@pytest.mark.parametrize("path", [paths.Path("flow"), paths.Path("vp_cosine")],
                         ids=["flow", "vp_cosine"])
def test_chain_on_gaussian_data_converges_to_the_exact_flow_map(path):
  """Teacher: the exact denoiser of N(μ, s²), x̂₀ = μ + a·s²/(a²s² + b²)·(x_t − a·μ).
  Halving 2N → … → 1 gives a 1-step student whose map x₁ ↦ x̂₀ approaches the exact
  PF-ODE map x₀ = μ + s·(x₁ − a₁μ)/√(a₁²s² + b₁²) as N grows (the chain's only error
  is the teacher's 2N-step DDIM discretisation)."""
  mu, s = 0.3, 0.5
  grid_t = lambda n: samplers.spacing.grid(path, n, "uniform")

  def exact_teacher(n2):
    g = grid_t(n2)
    def x0(i, x):
      a, b = path.ab(g[i])
      return mu + a * s ** 2 / (a ** 2 * s ** 2 + b ** 2) * (x - a * mu)
    return x0

  a1, b1 = path.ab(1.0)
  probe = jnp.linspace(-2.0, 2.0, 9)[:, None]
  exact = mu + s * (probe - a1 * mu) / jnp.sqrt(a1 ** 2 * s ** 2 + b1 ** 2)
  errors = []
  for start in (4, 32):  # the first student takes `start` steps: teacher 2·start DDIM
    teacher, n = exact_teacher(2 * start), start
    g = grid_t(2 * start)
    ddim = probe  # the teacher's own 2·start DDIM steps from the probe points
    for i in range(2 * start):
      t, s_ = jnp.full((9,), g[i]), jnp.full((9,), g[i + 1])
      ddim = progressive.ddim_step(path, teacher(i, ddim), ddim, t, s_)
    key = jax.random.key(start)
    while n >= 1:
      key, k = jax.random.split(key)
      # the student of this round takes n steps; as the next teacher it is read at its
      # own grid, which is the next round's 2·(n/2) grid
      teacher = _affine_round(path, teacher, n, mu, s, k)
      n //= 2
    one_step = teacher(0, probe)
    # what the chain distils: exactly the teacher's 2N-step DDIM map ...
    np.testing.assert_allclose(one_step, ddim, atol=2e-3)
    errors.append(float(jnp.max(jnp.abs(one_step - exact))))
  # ... which converges to the exact flow map at DDIM's first order (8× the steps: ~8×).
  assert errors[1] < 0.03 and errors[1] < errors[0] / 5, errors


def _student(data_dir, teacher, **overrides):
  return distill_config(data_dir, teacher, "progressive", **{
      "sample.sampler": "ddim", "sample.num_steps": 2, "sample.guidance": 0.0,
      "distill.guidance": 1.0, "train.num_steps": 4, "train.checkpoint_every": 2,
      **overrides})


CONFIG = os.path.join(ROOT, "configs", "digits_progressive.py")


def _train(data_dir, teacher, workdir, num_steps):
  """configs/digits_progressive.py (2 student steps) with the tiny model, through
  diffusion-jax-train's entry point (in this process, 1 device)."""
  run_train_in_process([f"--config={CONFIG}", f"--workdir={workdir}",
                        f"--config.data.data_dir={data_dir}", *TINY_FLAGS,
                        f"--config.distill.teacher={teacher}", "--config.sample.num_steps=2",
                        f"--config.train.num_steps={num_steps}",
                        "--config.train.checkpoint_every=2"])


def test_trains_resumes_exactly_and_samples_through_the_command_line(data_dir, tiny_teacher,
                                                                     tmp_path):
  """4 steps in one go == 2 + a resumed 2, bitwise (student, EMA, optimizer state); the
  teacher is in the state and never changes; the student samples with
  `diffusion-jax-sample` (a separate process that reads no teacher)."""
  from conftest import load_state
  from diffusion_jax import runs
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  _train(data_dir, tiny_teacher, whole, 4)
  _train(data_dir, tiny_teacher, resumed, 2)
  _train(data_dir, tiny_teacher, resumed, 4)
  raw, ema = load_state(whole)
  assert_trees_equal((raw, ema), load_state(resumed))
  assert set(raw) == {"student", "teacher"} and set(ema) == {"student"}
  teacher = jax.device_get(runs.load(tiny_teacher).params)
  assert_trees_equal(raw["teacher"], teacher)              # never updated
  assert any(not np.array_equal(x, y) for x, y in
             zip(jax.tree.leaves(raw["student"]), jax.tree.leaves(teacher)))
  assert os.listdir(whole / "samples") == ["step_0000004.png"]
  out = str(tmp_path / "s.npz")
  run_cli("sample", [f"--workdir={whole}", f"--output={out}", "--num_samples=10"])
  images = np.load(out)["images"]
  assert images.shape == (10, 8, 8, 1)


@pytest.mark.slow  # two rounds and a sample, three processes (~40 s)
def test_chain_trains_and_samples_through_the_command_line(data_dir, tiny_teacher, tmp_path):
  """launch/progressive.py: rounds 2 → 1 steps, the second round's teacher the first's
  student; the 1-step student samples with `diffusion-jax-sample`."""
  import subprocess
  from conftest import cli_env
  chain = str(tmp_path / "chain")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "progressive.py"), f"--config={CONFIG}",
       f"--teacher={tiny_teacher}", f"--workdir={chain}", "--start_steps=2", "--end_steps=1",
       f"--config.data.data_dir={data_dir}", *TINY_FLAGS[:-4], "--config.sample.per_class=1",
       "--config.train.num_steps=2", "--config.train.log_every=1"],
      capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  assert [__import__("json").loads(l)["steps"] for l in lines] == [2, 1]
  from diffusion_jax import runs
  config, _, _ = runs.read(os.path.join(chain, "steps_1"))
  assert config.distill.teacher == os.path.join(chain, "steps_2")
  assert config.sample.num_steps == 1
  out = str(tmp_path / "s.npz")
  run_cli("sample", [f"--workdir={os.path.join(chain, 'steps_1')}", f"--output={out}",
                     "--num_samples=10"])
  images = np.load(out)["images"]
  assert images.shape == (10, 8, 8, 1)


def test_bad_settings_name_the_key(data_dir, tiny_teacher, tmp_path):
  info = loop.dataset_info(_student(data_dir, tiny_teacher))
  with pytest.raises(ValueError, match="config.sample.sampler='ddim'"):
    progressive.make(_student(data_dir, tiny_teacher, **{"sample.sampler": "euler"}), info)
  with pytest.raises(ValueError, match="config.progressive.weighting"):
    progressive.make(_student(data_dir, tiny_teacher, **{"progressive.weighting": "snr"}), info)
  with pytest.raises(ValueError, match="config.sample.guidance=0"):
    loop.train(_student(data_dir, tiny_teacher, **{"sample.guidance": 1.0}), str(tmp_path / "g"))
  with pytest.raises(ValueError, match="model.channels: teacher has 8, this run has 16"):
    loop.train(_student(data_dir, tiny_teacher, **{"model.channels": 16}), str(tmp_path / "m"))
  with pytest.raises(ValueError, match="config.distill.teacher"):
    loop.train(_student(data_dir, "", **{}), str(tmp_path / "none"))
  assert not os.path.exists(tmp_path / "m" / "checkpoints" / "0")
