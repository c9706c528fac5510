"""Adversarial diffusion distillation (Sauer et al. 2024): the student's gradient is that
of L_adv + λ·L_distill written out by hand (the teacher and the discriminator called
directly; without the discriminator, of the distillation loss alone), the distillation
target is the teacher's CFG x̂₀ on the re-noised student output, the student's times are
its sampling grid's, the task trains, resumes exactly (both players and their optimizer
states) and samples 1 and 4 steps through the real command line, the ImageNet-256
latent recipe trains a step, and bad settings are errors naming the key."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (ROOT, TINY_FLAGS, assert_trees_equal, distill_config, read_metrics,
                      run_cli, run_train_in_process)
from diffusion_jax import checkpoint, config as config_lib, runs, samplers
from diffusion_jax.diffusion import paths
from diffusion_jax.nets import gan as gan_nets
from diffusion_jax.training import loop, tasks
from diffusion_jax.training.tasks import adversarial_distillation as add, diffusion
from diffusion_jax.training.tasks.base import StepContext
# The latent recipes' latent-cache fixture (an autoencoder run and its cache), shared.
from test_latent_recipes import IMAGENET, ONE_STEP, _assert_one_step, latent_cache  # noqa: F401

CONFIG = os.path.join(ROOT, "configs", "digits_adversarial_distillation.py")


def _student(data_dir, teacher, **overrides):
  return distill_config(data_dir, teacher, "adversarial_distillation", **{
      "sample.sampler": "consistency", "sample.guidance": 0.0, "distill.guidance": 1.0,
      "gan.discriminator": "dcgan", "gan.channels": 8, "gan.d_norm": "none",
      "gan.loss": "hinge", "gan.r1_weight": 0.1, "train.num_steps": 4,
      "train.checkpoint_every": 2, **overrides})


def _batch(n=8):
  k1, k2 = jax.random.split(jax.random.key(7))
  return {"image": jax.random.uniform(k1, (n, 8, 8, 1), minval=-1.0, maxval=1.0),
          "label": jax.random.randint(k2, (n,), 0, 10)}


def _teacher_x0(teacher, x_t, t, labels, w):
  """The tiny teacher's CFG x̂₀ by hand: flow path x_t = (1 − t)·x + t·ε, velocity
  v = ε − x, so x̂₀ = x_t − t·v; v = (1 + w)·v(y) − w·v(∅), ∅ = 10 classes."""
  net, params = teacher
  v_c = net.apply({"params": params}, x_t, t, labels)
  v_u = net.apply({"params": params}, x_t, t, jnp.full_like(labels, 10))
  v = (1 + w) * v_c - w * v_u
  return x_t - t[:, None, None, None] * v


def _draw(keys, salt, shape):
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), shape))(keys)


def _hand(config, info, teacher, student_params, x0, labels, keys):
  """(x̂_θ, x̂_ψ, t) by hand for the tiny flow/velocity student: student times
  {1, .75, .5, .25} (4 uniform steps), t = t_min + (t_max − t_min)·u."""
  net = diffusion.model(config, info)
  k = jax.vmap(lambda key: jax.random.randint(jax.random.fold_in(key, add._K), (), 0, 4))(keys)
  s = jnp.array([1.0, 0.75, 0.5, 0.25])[k]
  x_s = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * _draw(keys, 0, x0.shape[1:])
  x_hat = x_s - s[:, None, None, None] * net.apply({"params": student_params}, x_s, s, labels)
  a = config.adversarial
  u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, add._T)))(keys)
  t = a.teacher_t_min + (a.teacher_t_max - a.teacher_t_min) * u
  x_t = (1 - t)[:, None, None, None] * jax.lax.stop_gradient(x_hat) + \
      t[:, None, None, None] * _draw(keys, add._EPS2, x0.shape[1:])
  return x_hat, jax.lax.stop_gradient(_teacher_x0(teacher, x_t, t, labels, 1.0)), t


@pytest.fixture(scope="module")
def teacher_net(data_dir, tiny_teacher):
  c = runs.load(tiny_teacher)
  return diffusion.model(c.config, c.info), jax.device_get(c.params)


@pytest.mark.parametrize("adversarial_weight", [0.0, 0.5], ids=["distill_only", "with_d"])
def test_student_gradient_is_the_hand_written_loss(data_dir, tiny_teacher, teacher_net,
                                                   adversarial_weight):
  """∇_θ of the student player's loss = ∇_θ of λ·E a_t‖x̂_θ − sg(x̂_ψ)‖² (+ w_adv·the
  hinge generator loss −E D(x̂_θ, y) with the discriminator called directly); with
  adversarial_weight = 0 the task has no discriminator and the gradient is the
  distillation loss's alone."""
  c = _student(data_dir, tiny_teacher, **{"adversarial.adversarial_weight": adversarial_weight,
                                          "adversarial.teacher_t_min": 0.1})
  info = loop.dataset_info(c)
  task = tasks.make(c, info)
  names = [p.name for p in task.players]
  assert names == (["discriminator", "student"] if adversarial_weight else ["student"])
  state = jax.jit(task.init)(jax.random.key(0))
  assert set(state.params) == {"student", "teacher"} | ({"discriminator"} if adversarial_weight
                                                       else set())
  batch, keys = _batch(), jax.random.split(jax.random.key(3), 8)
  ctx = StepContext(step=jnp.zeros((), jnp.int32), update=0, dropout_key=jax.random.key(4),
                    axis_name=None, state=state)
  student = task.players[-1]
  theta = state.params["student"]

  @jax.jit
  def grads(theta):
    g_task = jax.grad(lambda th: student.loss(dict(state.params, student=th), batch, keys,
                                              ctx)[0])(theta)

    def hand(th):
      x_hat, target, t = _hand(c, info, teacher_net, th, batch["image"], batch["label"], keys)
      d = jnp.mean((1 - t) * jnp.mean(jnp.square(x_hat - target), axis=(1, 2, 3)))
      loss = 2.5 * d
      if adversarial_weight:
        d_net = gan_nets.build_discriminator(c, (8, 8, 1), 10)
        logits = d_net.apply(state.params["discriminator"], x_hat, batch["label"])
        loss = loss + adversarial_weight * -jnp.mean(logits)
      return loss
    return g_task, jax.grad(hand)(theta)

  g_task, g_hand = grads(theta)
  assert_trees_equal(g_task, g_hand, rtol=2e-4, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_hand)) > 1e-4


def test_distillation_target_is_the_teachers_cfg_x0_on_the_renoised_output(
    data_dir, tiny_teacher, teacher_net):
  """x̂_ψ = the teacher's x̂₀ under CFG w = 1 at x̂_{θ,t} = a_t·x̂_θ + b_t·ε′ (any x̂_θ),
  t ~ U[t_min, t_max]."""
  c = _student(data_dir, tiny_teacher, **{"adversarial.teacher_t_min": 0.3,
                                          "adversarial.teacher_t_max": 0.6})
  teacher_den, net = add.distill.teacher(c)
  keys = jax.random.split(jax.random.key(5), 64)
  x_hat = jax.random.normal(jax.random.key(6), (64, 8, 8, 1))
  labels = jnp.arange(64) % 10
  got, t = jax.jit(lambda x: add.distillation_target(
      c, teacher_den, net, paths.Path("flow"), x, labels, {}, keys, jnp.ones(64)))(x_hat)
  u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, add._T)))(keys)
  t_hand = 0.3 + 0.3 * u
  np.testing.assert_allclose(t, t_hand, rtol=1e-6)
  assert 0.3 <= float(t.min()) and float(t.max()) < 0.6
  x_t = (1 - t_hand)[:, None, None, None] * x_hat + \
      t_hand[:, None, None, None] * _draw(keys, add._EPS2, (8, 8, 1))
  want = jax.jit(lambda x, tt: _teacher_x0(teacher_net, x, tt, labels, 1.0))(x_t, t_hand)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_student_and_teacher_times():
  """The student's times are the first K of its K-step grid (ADD's {1000, 750, 500,
  250} at K = 4); 1 and 2 uniform sampling steps query only them. Teacher times on a
  discrete path are on its grid i/T, i ≥ 1; c(t) = a_t or 1."""
  c = config_lib.base()
  c.sample.num_steps = 4
  flow = paths.Path("flow")
  taus = np.asarray(add.student_times(c, flow))
  np.testing.assert_allclose(taus, [1.0, 0.75, 0.5, 0.25])
  for n in (1, 2):
    assert set(np.asarray(samplers.spacing.grid(flow, n, "uniform"))[:n]) <= set(taus)
  c.sample.times = (1.0, 0.8, 0.3, 0.1, 0.0)
  np.testing.assert_allclose(add.student_times(c, flow), [1.0, 0.8, 0.3, 0.1], rtol=1e-6)
  ddpm = paths.Path("vp_discrete", 1000, "linear")
  c.adversarial.teacher_t_min = 0.0
  t = np.asarray(add.teacher_times(c, ddpm, jax.random.split(jax.random.key(0), 4096)))
  np.testing.assert_allclose(t * 1000, np.round(t * 1000), atol=1e-3)
  assert t.min() >= 1e-3 - 1e-7 and t.max() <= 1.0
  np.testing.assert_allclose(add.weight("a_t", ddpm, jnp.asarray(t)), ddpm.ab(t)[0])
  np.testing.assert_array_equal(add.weight("uniform", flow, jnp.asarray(t)), 1.0)


def _checkpoint(workdir, step):
  """The whole TrainState saved at `step` (params, EMA, optimizer states) as numpy."""
  mngr = checkpoint.manager(str(workdir), read_only=True)
  try:
    saved = mngr.item_metadata(step)["state"]
    tree = getattr(saved, "tree", saved)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), tree)
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))["state"]
  finally:
    mngr.close()
  return jax.device_get(state)


def _train(data_dir, teacher, workdir, num_steps):
  """configs/digits_adversarial_distillation.py with the tiny model, through
  diffusion-jax-train's entry point (in this process, 1 device)."""
  run_train_in_process([f"--config={CONFIG}", f"--workdir={workdir}",
                        f"--config.data.data_dir={data_dir}", *TINY_FLAGS,
                        f"--config.distill.teacher={teacher}", "--config.gan.mlp_width=16",
                        f"--config.train.num_steps={num_steps}",
                        "--config.train.checkpoint_every=2", "--config.sample.per_class=0"])


@pytest.fixture(scope="module")
def trained(data_dir, tiny_teacher, tmp_path_factory):
  """The digits config trained 4 steps in one go."""
  w = tmp_path_factory.mktemp("add_whole")
  _train(data_dir, tiny_teacher, w, 4)
  return w


def test_resume_through_the_command_line_is_exact(data_dir, tiny_teacher, trained, tmp_path):
  """4 steps in one go equal 2 + a resumed 2 bitwise: both players, the EMA and both
  optimizer states; the teacher is unchanged; the loop logs both players."""
  _train(data_dir, tiny_teacher, tmp_path, 2)
  _train(data_dir, tiny_teacher, tmp_path, 4)
  state = _checkpoint(trained, 4)
  assert_trees_equal(_checkpoint(tmp_path, 4), state)
  assert set(state["params"]) == {"student", "teacher", "discriminator"}
  assert set(state["ema_params"]) == {"student"}
  assert set(state["opt_state"]) == {"student", "discriminator"}
  assert_trees_equal(state["params"]["teacher"], jax.device_get(runs.load(tiny_teacher).params))
  moved = [not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(state["params"]["student"]), jax.tree.leaves(state["params"]["teacher"]))]
  assert any(moved)                          # started from the teacher, then trained
  m = read_metrics(trained)[-1]
  assert {"distill", "adv", "d_real", "d_fake", "r1", "d_loss", "student_loss",
          "grad_norm_d", "grad_norm_student"} <= set(m) and m["nonfinite"] == 0


@pytest.mark.parametrize("steps", [1, 4])
def test_samples_1_and_4_steps_through_the_command_line(trained, tmp_path, steps):
  """diffusion-jax-sample (a separate process; no teacher needed) with --steps."""
  out = tmp_path / "s.npz"
  run_cli("sample", [f"--workdir={trained}", f"--output={out}", "--num_samples=10",
                     "--labels=3,7", f"--steps={steps}"])
  with np.load(out) as f:
    assert f["images"].shape == (10, 8, 8, 1) and f["labels"].tolist() == [3, 7] * 5
    assert np.all(np.isfinite(f["values"])) and f["values"].std() > 0


@pytest.mark.slow  # an autoencoder, a latent cache and a DiT teacher first (~1 min)
def test_imagenet_recipe_trains_one_step_on_a_latent_cache(latent_cache, tmp_path):
  """configs/imagenet256_adversarial_distillation.py with its DiT shrunk, on the digits'
  latent cache: the teacher is the DiT-XL/2 recipe trained one step with the same
  overrides; the student's discriminator works on the 8×8×4 latents."""
  flags = [f"--config.data.name={latent_cache}", "--config.model.variant=", *ONE_STEP]
  teacher, student = str(tmp_path / "dit"), str(tmp_path / "add")
  run_train_in_process([f"--config={IMAGENET}", f"--workdir={teacher}", *flags])
  run_train_in_process([f"--config={os.path.join(ROOT, 'configs', 'imagenet256_adversarial_distillation.py')}",
                        f"--workdir={student}", f"--config.distill.teacher={teacher}",
                        "--config.gan.channels=8", *flags])
  _assert_one_step(student)
  (m,) = [m for m in read_metrics(student) if "loss" in m]
  assert np.isfinite(m["distill"]) and np.isfinite(m["d_loss"])


def test_bad_settings_name_the_key(data_dir, tiny_teacher, tmp_path):
  c = _student(data_dir, tiny_teacher)
  info = loop.dataset_info(c)
  bad = {
      "config.sample.sampler": {"sample.sampler": "euler"},
      "config.sample.guidance=0": {"sample.guidance": 1.0},
      "config.adversarial.distill_weighting": {"adversarial.distill_weighting": "snr"},
      "config.adversarial.adversarial_weight": {"adversarial.adversarial_weight": -1.0},
      "adversarial_weight are both 0": {"adversarial.adversarial_weight": 0.0,
                                        "adversarial.distill_weight": 0.0},
      "config.adversarial.teacher_t_min": {"adversarial.teacher_t_min": 0.5,
                                           "adversarial.teacher_t_max": 0.5},
      "config.gan.d_norm='batch'": {"gan.d_norm": "batch"},
      "config.gan.d_steps=3": {"gan.d_steps": 3},
      "config.optim.trainable": {"optim.trainable": ("conv",)},
      "config.gan.discriminator='patchgan' cannot be class-conditional":
          {"gan.discriminator": "patchgan"},
  }
  for match, overrides in bad.items():
    with pytest.raises(ValueError, match=match):
      tasks.make(_student(data_dir, tiny_teacher, **overrides), info)
  with pytest.raises(ValueError, match="config.distill.teacher"):
    loop.train(_student(data_dir, ""), str(tmp_path / "none"))
  with pytest.raises(ValueError, match="model.channels: teacher has 8, this run has 16"):
    loop.train(_student(data_dir, tiny_teacher, **{"model.channels": 16}), str(tmp_path / "m"))
