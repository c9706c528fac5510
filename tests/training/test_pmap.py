"""One step body, three ways to run it, one result: jit on a 1-device mesh, jit with
the batch sharded over an 8-device mesh, and jax.pmap over the 8 devices. Same
batches, same keys, K steps; losses, gradient norms and parameters agree.

(model.dropout is 0 here: under pmap the dropout masks are drawn per device, so with
dropout > 0 pmap matches jit only in distribution.)"""
import jax
import numpy as np
import pytest

from conftest import tiny_config
from diffusion_jax import data, parallel
from diffusion_jax.training import loop, step as step_lib, tasks

K = 4
RTOL, ATOL = 1e-5, 1e-6
# LLVM -O0 for every program here: compiles ~2-5x faster on CPU; the HLO (so what is
# being compared) is unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def setup(data_dir):
  assert jax.device_count() == 8, "conftest sets 8 virtual CPU devices"
  # SGD, no warmup: every step moves the parameters by lr × (global-mean) gradient, so
  # a wrong gradient shows in them. (Adam would not do: some biases get an exactly-zero
  # gradient, a per-channel constant before single-channel GroupNorm groups, and Adam
  # scales their rounding noise, which depends on the reduction order, up to ~lr.)
  # The output conv and each residual branch's last conv start at zero, so gradients
  # reach the whole network from the second step on.
  config = tiny_config(data_dir, **{
      "data.batch_size": 16, "optim.name": "sgd", "optim.lr": 0.05,
      "optim.schedule": "constant", "optim.warmup_steps": 0})
  assert config.data.batch_size % 8 == 0
  info = loop.dataset_info(config)
  task = tasks.make(config, info)
  init_key, step_root, _ = loop.keys(config.seed)
  state = jax.device_get(jax.jit(task.init, compiler_options=FAST_COMPILE)(init_key))
  it = data.make_train_iterator(config.data, seed=config.seed)
  batches = [next(it) for _ in range(K)]
  step_keys = [jax.random.fold_in(step_root, s) for s in range(K)]
  body = step_lib.make_train_step(task)
  return config, task, info, init_key, state, batches, step_keys, body


def _run_mesh(setup, mesh):
  """K jitted steps as the train loop runs them, on `mesh`."""
  config, task, info, init_key, state, batches, step_keys, body = setup
  abstract = jax.eval_shape(task.init, init_key)
  shardings = parallel.state_shardings(mesh, abstract, config.mesh)
  repl = parallel.replicated(mesh)
  step = jax.jit(body, in_shardings=(shardings, parallel.batch_sharding(mesh), repl),
                 out_shardings=(shardings, repl), compiler_options=FAST_COMPILE)
  state = jax.device_put(state, shardings)
  history = []
  for batch, key in zip(batches, step_keys):
    state, metrics = step(state, parallel.host_to_global(batch, mesh), key)
    history.append([float(metrics["loss"]), float(metrics["grad_norm"])])
  return np.array(history), jax.device_get(state)


@pytest.fixture(scope="module")
def one_device(setup):
  config = setup[0]
  return _run_mesh(setup, parallel.make_mesh(config.mesh, devices=jax.devices()[:1]))


def _assert_same(got, want):
  got_history, got_state = got
  want_history, want_state = want
  np.testing.assert_allclose(got_history, want_history, rtol=RTOL, atol=ATOL,
                             err_msg="[step, (loss, grad_norm)]")
  assert int(got_state.step) == int(want_state.step) == K
  for name in ("params", "ema_params"):
    flat_want = jax.tree_util.tree_flatten_with_path(getattr(want_state, name))[0]
    flat_got = jax.tree.leaves(getattr(got_state, name))
    assert len(flat_got) == len(flat_want) > 0
    for (path, w), g in zip(flat_want, flat_got):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL,
                                 err_msg=f"{name}{jax.tree_util.keystr(path)}")


@pytest.mark.slow  # CI time (cold compile cache); other default tests hold this invariant
def test_pmap_equals_jit(setup, one_device):
  _, _, _, _, state, batches, step_keys, body = setup
  replicated = parallel.replicate(state)
  split = [parallel.split_for_pmap(b) for b in batches]
  step = parallel.pmap_step(body).lower(replicated, split[0], step_keys[0]).compile(
      FAST_COMPILE)
  history = []
  for batch, key in zip(split, step_keys):
    replicated, metrics = step(replicated, batch, key)
    loss, grad_norm = np.asarray(metrics["loss"]), np.asarray(metrics["grad_norm"])
    assert loss.shape == (8,)
    # After the pmean every device holds the global mean.
    assert np.all(loss == loss[0]) and np.all(grad_norm == grad_norm[0])
    history.append([float(loss[0]), float(grad_norm[0])])
  _assert_same((np.array(history), jax.device_get(parallel.unreplicate(replicated))),
               one_device)


def test_eight_devices_equal_one(setup, one_device):
  config = setup[0]
  mesh = parallel.make_mesh(config.mesh)
  assert mesh.devices.size == 8
  _assert_same(_run_mesh(setup, mesh), one_device)
