"""The train step and loop in-process: non-finite handling, EMA, schedules, FSDP,
and every config in configs/ running one train step and one sample call."""
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, assert_trees_equal, load_state, run_train_in_process, tiny_config
from diffusion_jax import config as config_lib, data
from diffusion_jax.training import loop, optim, state as state_lib, step as step_lib, tasks
import diffusion_jax_configs


def _toy_step(ema_decay, trainable=None):
  """The generic step of a one-player task whose loss, (w·x)² + (v·x)², is NaN when
  batch['x'] is NaN."""
  def loss_fn(params, batch, keys, ctx):
    del keys, ctx
    return jnp.mean((params["w"] * batch["x"]) ** 2 + (params["v"] * batch["x"]) ** 2), (
        {}, params)
  mask = optim.trainable(trainable)  # what optim.make does with config.optim.trainable
  player = tasks.Player(loss=loss_fn, tx=optim.masked(optax.sgd(0.1), mask),
                        schedule=optax.constant_schedule(0.1), ema_decay=ema_decay, mask=mask)
  task = tasks.Task(init=None, players=(player,))
  params = {"w": jnp.array(2.0), "v": jnp.array(1.0)}
  return step_lib.make_train_step(task), state_lib.init_state(task.players, params)


def test_nonfinite_step_is_skipped():
  step, st = _toy_step(ema_decay=0.9)
  st, m = step(st, {"x": jnp.ones(4)}, jax.random.key(0))
  assert int(m["nonfinite"]) == 0 and float(st.params["w"]) == pytest.approx(2.0 - 0.1 * 4.0)
  before = st
  st, m = step(st, {"x": jnp.full(4, jnp.nan)}, jax.random.key(1))
  assert int(m["nonfinite"]) == 1 and int(st.step) == 2
  assert float(st.params["w"]) == float(before.params["w"])
  assert float(st.ema_params["w"]) == float(before.ema_params["w"])


def test_ema_update_formula():
  step, st = _toy_step(ema_decay=0.5)
  w0 = 2.0
  st, _ = step(st, {"x": jnp.ones(4)}, jax.random.key(0))
  d = min(0.5, 1.0 / 10.0)  # warm-up decay at step 0
  assert float(st.ema_params["w"]) == pytest.approx(d * w0 + (1 - d) * float(st.params["w"]))


def test_trainable_subset_freezes_the_rest_and_has_no_state_for_it():
  """config.optim.trainable: only matching parameters move, and the frozen ones have no
  optimizer state (optax.set_to_zero's is empty), so memory follows what trains."""
  step, st = _toy_step(ema_decay=0.9, trainable=("^w$",))
  st, m = step(st, {"x": jnp.ones(4)}, jax.random.key(0))
  assert float(st.params["w"]) == pytest.approx(2.0 - 0.1 * 4.0)
  assert float(st.params["v"]) == 1.0 and float(st.ema_params["v"]) == 1.0
  # The gradient norm is the trainable part's: |dL/dw| = 2·w·E[x²] = 4.
  assert float(m["grad_norm"]) == pytest.approx(4.0)
  c = config_lib.base()
  c.optim.name, c.optim.trainable = "adam", ("^w$",)
  tx, _ = optim.make(c.optim, 10)
  state = tx.init({"w": jnp.ones((3, 3)), "v": jnp.ones((1000,))})
  sizes = [x.size for x in jax.tree.leaves(state)]
  assert sum(sizes) == 2 * 9 + 2  # Adam's mu and nu of w (+ counts); nothing of v
  c.optim.trainable = ("nothing_matches",)
  with pytest.raises(ValueError, match="nothing_matches"):
    optim.make(c.optim, 10)[0].init({"w": jnp.ones(())})


def test_structural_diff_ignores_compute_only_keys():
  """A resume may switch remat / bf16 compute / attention kernel, not widths."""
  saved, cur = config_lib.base(), config_lib.base()
  cur.model.remat, cur.model.dtype, cur.model.attention_impl = "nothing", "bfloat16", "xla"
  assert config_lib.structural_diff(saved, cur) == []
  cur.model.channels, cur.gan.latent_dim, cur.gan.loss = 32, 8, "hinge"
  assert [d.split(":")[0] for d in config_lib.structural_diff(saved, cur)] == [
      "gan.latent_dim", "model.channels"]


def test_schedule_warmup_then_cosine():
  cfg = config_lib.base().optim
  cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio = 1.0, 10, 0.1
  sched = optim.schedule(cfg, 110)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
  assert float(sched(110)) == pytest.approx(0.1, rel=1e-5)


def test_on_nonfinite_stop_raises_and_keeps_checkpoints(data_dir, tmp_path):
  """An absurd learning rate without clipping: Adam's first update moves every
  parameter by ±1e38 (finite; checkpointed), the second step's loss overflows, and the
  run must stop without applying it or touching the checkpoint. (1 device, and a
  one-level U-Net with only its middle attention: any network overflows so.)"""
  c = tiny_config(data_dir, **{"train.on_nonfinite": "stop", "train.checkpoint_every": 1,
                               "train.num_steps": 50, "data.batch_size": 8,
                               "model.channel_mult": (1,), "model.attn_resolutions": ()})
  c.train.async_checkpointing = False
  c.optim.lr, c.optim.grad_clip, c.optim.warmup_steps, c.optim.schedule = 1e38, 0.0, 0, "constant"
  with pytest.raises(FloatingPointError, match="on_nonfinite"):
    loop.train(c, str(tmp_path), devices=jax.devices()[:1])
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  params, ema = load_state(tmp_path, 1)
  leaves = jax.tree.leaves(params) + jax.tree.leaves(ema)
  assert all(np.all(np.isfinite(x)) for x in leaves)
  assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(params)) > 1e37  # step 1 applied


@pytest.mark.slow  # CI time (cold compile cache); other default tests hold this invariant
def test_fsdp_equals_data_parallel(data_dir, tmp_path):
  """mesh.fsdp=4 (parameters sharded 4 ways, batch over all 8 devices) gives the same
  parameters as pure data parallelism. SGD: Adam divides by √v and so scales the
  summation-order noise of gradients that are exactly zero in exact arithmetic (biases
  before a GroupNorm) up to ~lr, which the two reduction orders differ by."""
  results = []
  for fsdp in (1, 4):
    c = tiny_config(data_dir, **{"train.num_steps": 3, "train.checkpoint_every": 3,
                                 "mesh.fsdp": fsdp, "mesh.fsdp_min_size": 64,
                                 "data.batch_size": 16, "sample.per_class": 0,
                                 "optim.name": "sgd", "optim.lr": 0.05,
                                 "optim.schedule": "constant", "optim.warmup_steps": 0})
    c.train.async_checkpointing = False
    w = tmp_path / f"fsdp{fsdp}"
    final = loop.train(c, str(w))
    if fsdp == 4:  # something is really sharded
      specs = [x.sharding.spec for x in jax.tree.leaves(final.params)]
      assert any("fsdp" in tuple(s) for s in specs)
    results.append(load_state(w))
    assert not (w / "samples").exists()  # sample.per_class=0: no grids
  assert_trees_equal(results[0], results[1], rtol=1e-5, atol=1e-6)


def _load_config(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# Large models compile for tens of seconds on the 2-core machine: tested with -m slow.
# (The mnist5k ones share the quickstart's code paths; super-resolution also has its
# own command-line test in tests/test_cli.py.)
_SLOW_CONFIGS = {"cifar10_ddpm.py",      # 35.7M parameters: ~37 s
                 # the distillation recipes for accelerators (teacher + student: ~2×)
                 "cifar10_consistency.py", "mnist5k_progressive.py",
                 "mnist5k_guidance_distillation.py", "mnist5k_adversarial_distillation.py",
                 "mnist5k_flow.py", "mnist5k_superres.py",  # 3-level 32-ch U-Nets: ~20 s each
                 "gan_mnist5k.py", "gan_mnist5k_cond.py",  # ~16 s each; gan_digits covers the code
                 # the tasks' own digits tests cover these paths (autoencoder, vae, latent)
                 "mnist5k_autoencoder.py", "mnist5k_vae.py"}
# digits_t2i.py needs a finished clip run (text.clip_workdir): tests/training/
# test_text_to_image.py trains one and runs it through the command line.
# The latent recipes need a latent cache / clip run: tests/test_latent_recipes.py runs
# each for one step through the command line at a tiny size.
_OWN_TESTS = {"digits_t2i.py", "imagenet256_dit_xl2.py", "mnist5k_latent_t2i.py",
              # fine-tuning a text-to-image run (a clip run, a base, class images):
              # tests/training/test_finetune.py runs them through the command line
              "digits_finetune.py", "digits_dreambooth.py", "digits_dreambooth_lora.py",
              "digits_textual_inversion.py",
              # the 256² accelerator recipe: tests/test_latent_recipes.py (a clip run,
              # an autoencoder, a base of its network; -m slow)
              "t2i256_dreambooth_lora.py",
              # stage two of guidance distillation: its teacher is a stage-one run
              # (tests/training/test_guidance_distillation.py trains both)
              "digits_guided_progressive.py",
              # full-size teacher + student exceed the CI machine's memory; the
              # recipes' own tests run them shrunk (tests/test_configs.py,
              # tests/training/test_adversarial_distillation.py)
              "imagenet64_guidance_distillation.py", "imagenet256_adversarial_distillation.py"}
_DISTILLATION = ("progressive", "guidance_distillation", "consistency",
                 "adversarial_distillation")
# Trained by their own default tests, which hold this test's invariant for them: the
# config's own model through diffusion-jax-train, checkpointed, no sample grid
# (tests/training/test_clip_task.py::test_train_cli_then_held_out_retrieval, 150 steps).
_COVERED = {"digits_clip.py",
            # the quickstart's own network (its row runs it); each task's default test
            # trains the config through diffusion-jax-train at the tiny size, teacher first
            "digits_progressive.py", "digits_guidance_distillation.py",
            "digits_adversarial_distillation.py", "digits_consistency.py",
            "digits_consistency_training.py",
            # LoRA + the class table from a base: tests/training/test_finetune.py's
            # class-table test trains the same subset through the loop
            "digits_lora.py"}
CONFIGS = [pytest.param(p, marks=pytest.mark.slow)
           if os.path.basename(p) in _SLOW_CONFIGS | _COVERED else p
           for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
           if os.path.basename(p) not in _OWN_TESTS
           and os.path.basename(p)[:-3] not in diffusion_jax_configs.HELPERS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_every_config_trains_one_step_and_samples(path, data_dir, tmp_path):
  """Each shipped config, through diffusion-jax-train's entry point (in this process,
  on one device like a 1-device command line; tests/test_cli.py has the separate
  process): one train step, a checkpoint and one sample call (the end-of-run grid).
  Datasets that must be prepared beforehand (cifar10...) are swapped for the embedded
  digits; the model is the config's own."""
  c = _load_config(path)
  config_lib.validate(c)
  try:
    data.get_source(c.data.name, c.data.split, data_dir)
    name = c.data.name
  except ValueError:
    name = "sklearn_digits"
  extra = ["--config.superres.low_res=4"] if name != c.data.name and c.superres.low_res else []
  common = [f"--config.data.name={name}", f"--config.data.data_dir={data_dir}",
            "--config.data.batch_size=8", "--config.data.num_threads=0",
            "--config.train.num_steps=1", "--config.train.checkpoint_every=1",
            "--config.train.log_every=1", "--config.sample.num_steps=2",
            "--config.sample.per_class=1"]
  if c.distill.teacher or c.task in _DISTILLATION and not (
      c.task == "consistency" and c.consistency.mode == "training"):
    # A distillation student: its teacher is the same config's network trained as a
    # diffusion run (one step), as the config's docstring command does with a real one.
    run_train_in_process([f"--config={path}", f"--workdir={tmp_path / 'teacher'}",
                          "--config.task=diffusion", "--config.model.guidance_input=False",
                          "--config.sample.per_class=0", *extra, *common])
    extra.append(f"--config.distill.teacher={tmp_path / 'teacher'}")
  if c.task == "finetune" or c.init.map:
    # Fine-tuning: its base is the same config's network trained as a diffusion run.
    run_train_in_process([f"--config={path}", f"--workdir={tmp_path / 'base'}",
                          "--config.task=diffusion", "--config.init.map=()",
                          "--config.init.rules=()", "--config.optim.trainable=()",
                          "--config.sample.per_class=0", *extra, *common])
    extra.append(f"--config.init.from_workdir={tmp_path / 'base'}")
  run_train_in_process([f"--config={path}", f"--workdir={tmp_path}", *extra, *common])
  assert os.listdir(tmp_path / "checkpoints") == ["1"]
  if c.task in ("classifier", "clip", "autoencoder") or name == "ring8":  # no sampler; points
    assert not os.path.exists(tmp_path / "samples")
  else:
    assert os.listdir(tmp_path / "samples") == ["step_0000001.png"]
