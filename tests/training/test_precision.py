"""Precision of the training state: with bfloat16 parameters (model.param_dtype) the EMA
and the optimizer state are float32, so the EMA keeps moving at decay 0.999 and Adam's
moments follow their formulas; float32 runs are unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_state, quickstart_args, run_train_in_process, tiny_config
from diffusion_jax import config as config_lib, data
from diffusion_jax.training import loop, optim, state as state_lib, step as step_lib, tasks

F32_TOL = 2.0 ** -21  # a few float32 roundings, relative to |ema| + |p|


def _floats(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def test_bf16_parameters_have_a_float32_ema_that_moves(data_dir):
  """Past the EMA's warm-up (d = 0.999) a bfloat16 EMA rounds the steps of all but
  near-zero entries away; the float32 one takes each step, equal to
  ema + (1 − d)(p − ema) in float64, and its parameters sample like the model's own."""
  c = tiny_config(data_dir, **{"model.param_dtype": "bfloat16", "model.dtype": "bfloat16",
                               "optim.schedule": "constant", "optim.warmup_steps": 0})
  task = tasks.make(c, loop.dataset_info(c))
  st = jax.jit(task.init)(jax.random.key(0))
  assert {x.dtype for x in _floats(st.params)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in _floats(st.ema_params)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for x in _floats(st.opt_state)} == {jnp.dtype(jnp.float32)}  # Adam's μ, ν
  st = st.replace(step=jnp.asarray(10 ** 6, jnp.int32))  # min(0.999, (1+n)/(10+n)) = 0.999
  step = jax.jit(step_lib.make_train_step(task))
  batches = data.make_train_iterator(c.data, seed=0, text=task.text)
  for i in range(3):
    ema = jax.device_get(st.ema_params)
    st, m = step(st, next(batches), jax.random.key(i))
    assert int(m["nonfinite"]) == 0
    new, p = jax.device_get(st.ema_params), jax.device_get(st.params)
    moved = changed = 0
    for e0, e1, pl in zip(jax.tree.leaves(ema), jax.tree.leaves(new), jax.tree.leaves(p)):
      e0, e1, pl = (np.asarray(a, np.float64) for a in (e0, e1, pl))
      want = e0 + (1 - 0.999) * (pl - e0)
      np.testing.assert_array_less(np.abs(e1 - want), F32_TOL * (np.abs(e0) + np.abs(pl)) + 1e-30)
      moved += int(np.sum((e1 != e0) & (pl != e0)))
      changed += int(np.sum(pl != e0))
    # Every entry whose parameter differs from its EMA moves.
    assert changed > 0 and moved >= 0.99 * changed, (moved, changed)
  assert {x.dtype for x in _floats(st.params)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in _floats(st.ema_params) + _floats(st.opt_state)} == {
      jnp.dtype(jnp.float32)}

  # The float32 EMA samples with the bfloat16 model (flax casts each parameter to
  # model.dtype where it is used) as its bfloat16 rounding does.
  sample = jax.jit(task.generator.sample())
  cond = task.generator.conditioning(np.arange(4) % 10)
  keys = jax.random.split(jax.random.key(1), 4)
  x32, _ = sample(st.ema_params, cond, keys)
  x16, _ = sample(jax.tree.map(lambda a: a.astype(jnp.bfloat16), st.ema_params), cond, keys)
  assert x32.dtype == jnp.float32 and np.all(np.isfinite(x32))
  np.testing.assert_allclose(x32, x16, atol=1e-2)


def test_bf16_adam_moments_follow_the_float64_formula():
  """Constant gradients g for k steps: μ = (1 − b1ᵏ) g, ν = (1 − b2ᵏ) g² (a bfloat16 ν
  never decays: bfloat16(0.999) is 1); the updates are float32, the parameters stay
  bfloat16."""
  c = config_lib.base()
  c.optim.name, c.optim.schedule, c.optim.warmup_steps = "adam", "constant", 0
  c.optim.grad_clip = 0.0
  tx, _ = optim.make(c.optim, 100)
  params = {"w": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.bfloat16)}
  g = {"w": jnp.linspace(0.5, 2.0, 64, dtype=jnp.bfloat16)}
  opt = tx.init(params)
  k = 20
  for _ in range(k):
    updates, opt = tx.update(g, opt, params)
    assert updates["w"].dtype == jnp.float32
    params = optax.apply_updates(params, updates)
  assert params["w"].dtype == jnp.bfloat16
  adam = opt[1][0]  # chain(clip, adam(scale_by_adam, scale_by_lr))
  assert adam.mu["w"].dtype == adam.nu["w"].dtype == jnp.float32
  gw = np.asarray(g["w"], np.float64)
  np.testing.assert_allclose(adam.mu["w"], (1 - c.optim.b1 ** k) * gw, rtol=1e-5)
  np.testing.assert_allclose(adam.nu["w"], (1 - c.optim.b2 ** k) * gw ** 2, rtol=1e-5)


def test_frozen_bf16_leaves_keep_their_dtype_and_their_ema_is_the_leaf():
  """A frozen leaf (config.optim.trainable) has no optimizer state and its EMA is the
  leaf bit for bit, in its own dtype (no float32 copy of a frozen network); the trained
  leaf's EMA is float32."""
  def loss_fn(params, batch, keys, ctx):
    del keys, ctx
    return jnp.mean(batch["x"] ** 2) * jnp.sum(params["w"] ** 2 + params["v"] ** 2), ({}, params)
  mask = optim.trainable(("^w$",))
  player = tasks.Player(loss=loss_fn, tx=optim.masked(optim.in_float32(optax.sgd(0.1, 0.9)), mask),
                        schedule=optax.constant_schedule(0.1), ema_decay=0.999, mask=mask)
  task = tasks.Task(init=None, players=(player,))
  params = {"w": jnp.full((8,), 2.0, jnp.bfloat16), "v": jnp.full((8,), 1.0 / 3, jnp.bfloat16)}
  st = state_lib.init_state(task.players, params)
  step = jax.jit(step_lib.make_train_step(task))
  for i in range(3):
    st, _ = step(st, {"x": jnp.ones(4)}, jax.random.key(i))
    assert st.params["w"].dtype == st.params["v"].dtype == st.ema_params["v"].dtype == jnp.bfloat16
    assert st.ema_params["w"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(st.ema_params["v"]).view(np.uint16),
                                  np.asarray(params["v"]).view(np.uint16))
  assert {x.dtype for x in _floats(st.opt_state)} == {jnp.dtype(jnp.float32)}
  assert sum(x.size for x in _floats(st.opt_state)) == 8  # momentum of w; nothing of v


def test_float32_state_is_unchanged():
  """float32 parameters: the optimizer state has tx's own structure and values and the
  updates are tx's bit for bit; the EMA starts as a copy, not the same buffer."""
  c = config_lib.base()
  plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
  tx = optim.in_float32(plain)
  params = {"w": jax.random.normal(jax.random.key(0), (16,)), "b": jnp.zeros((3,))}
  grads = jax.tree.map(lambda x: jnp.cos(x) + 0.5, params)
  a, b = tx.init(params), plain.init(params)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for _ in range(3):
    (ua, a), (ub, b) = tx.update(grads, a, params), plain.update(grads, b, params)
  for x, y in zip(jax.tree.leaves((ua, a)), jax.tree.leaves((ub, b))):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)
  player = tasks.Player(loss=None, tx=optim.make(c.optim, 10)[0],
                        schedule=optax.constant_schedule(0.1), ema_decay=0.9)
  st = state_lib.init_state((player,), params)
  for e, p in zip(jax.tree.leaves(st.ema_params), jax.tree.leaves(params)):
    assert e.dtype == p.dtype and e is not p
    np.testing.assert_array_equal(e, p)


@pytest.mark.slow
def test_bf16_run_saves_a_float32_ema_and_resumes(data_dir, tmp_path):
  """Through diffusion-jax-train: a bfloat16-parameter run checkpoints bfloat16
  parameters and a float32 EMA, and resumes from them."""
  flags = ["--config.model.param_dtype=bfloat16", "--config.train.checkpoint_every=2",
           "--config.sample.per_class=0"]
  run_train_in_process(quickstart_args(tmp_path, data_dir, "--config.train.num_steps=2", *flags))
  run_train_in_process(quickstart_args(tmp_path, data_dir, "--config.train.num_steps=4", *flags))
  params, ema = load_state(tmp_path)
  assert {x.dtype for x in _floats(params)} == {np.dtype(jnp.bfloat16)}
  assert {x.dtype for x in _floats(ema)} == {np.dtype(np.float32)}
  assert any(np.any(e != p.astype(np.float32))
             for e, p in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))


@pytest.mark.slow
def test_bf16_run_warm_started_keeps_a_float32_ema(data_dir, tmp_path):
  """config.init.from_workdir into a bfloat16 run: the EMA starts as the merged
  parameters in the EMA's own dtype (float32), so it moves and the run resumes."""
  flags = ["--config.train.checkpoint_every=2", "--config.sample.per_class=0"]
  run_train_in_process(quickstart_args(tmp_path / "base", data_dir, "--config.train.num_steps=2",
                                       *flags))
  flags += ["--config.model.param_dtype=bfloat16",
            f"--config.init.from_workdir={tmp_path / 'base'}"]
  run_train_in_process(quickstart_args(tmp_path / "run", data_dir, "--config.train.num_steps=2",
                                       *flags))
  assert {x.dtype for x in _floats(load_state(tmp_path / "run")[1])} == {np.dtype(np.float32)}
  run_train_in_process(quickstart_args(tmp_path / "run", data_dir, "--config.train.num_steps=4",
                                       *flags))
