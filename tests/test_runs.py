"""A finished run as a frozen component (`runs.load`): the parameters asked for, with
the run's own shardings on the mesh they are loaded onto, and never the optimizer
state (which may be absent or of another optimizer)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_equal, tiny_config
from diffusion_jax import checkpoint, data, parallel, runs
from diffusion_jax.training import tasks
from diffusion_jax.training.state import TrainState

INFO = data.DatasetInfo((8, 8, 1), 10, 0)


def _save(workdir, config, state):
  """A checkpoint at step 0 as the training loop writes it."""
  mngr = checkpoint.manager(str(workdir), async_save=False)
  checkpoint.save(mngr, 0, state, {}, runs.metadata(config, INFO))
  mngr.wait_until_finished()
  mngr.close()


def _state(config, mesh):
  task = tasks.make(config, INFO)
  abstract = jax.eval_shape(task.init, jax.random.key(0))
  shardings = parallel.state_shardings(mesh, abstract, config.mesh)
  return jax.jit(task.init, out_shardings=shardings)(jax.random.key(0))


@pytest.fixture(scope="module")
def fsdp_state(data_dir):
  """(config, mesh, state) of a tiny U-Net run with parameters sharded 8 ways (SGD)."""
  c = tiny_config(data_dir, **{"mesh.fsdp": 8, "mesh.fsdp_min_size": 64, "optim.name": "sgd"})
  mesh = parallel.make_mesh(c.mesh)
  return c, mesh, _state(c, mesh)


def test_component_keeps_its_fsdp_sharding(fsdp_state, tmp_path):
  """A model trained with FSDP over 8 devices, loaded onto an FSDP mesh, keeps its
  parameters sharded as the run's rules say (not replicated); onto a data-parallel
  mesh the same run is replicated. Values equal the saved EMA either way."""
  c, fsdp_mesh, state = fsdp_state
  _save(tmp_path, c, state)
  comp = runs.load(str(tmp_path), mesh=fsdp_mesh)
  assert comp.step == 0 and comp.info == INFO and comp.config.mesh.fsdp == 8
  want = jax.tree.map(lambda x: x.sharding.spec, state.ema_params)
  got = jax.tree.map(lambda x: x.sharding.spec, comp.params)
  assert got == want
  specs = jax.tree.leaves(got, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert sum("fsdp" in tuple(s) for s in specs) >= 5  # really sharded
  big = max(jax.tree.leaves(comp.params), key=lambda x: x.size)
  assert len({s.data.shape for s in big.addressable_shards}) == 1
  assert big.addressable_shards[0].data.size == big.size // 8
  assert_trees_equal(jax.device_get(comp.params), jax.device_get(state.ema_params))
  dp = runs.load(str(tmp_path), params="raw")  # default mesh: data parallel
  assert all(tuple(x.sharding.spec) == () for x in jax.tree.leaves(dp.params))
  assert_trees_equal(jax.device_get(dp.params), jax.device_get(state.params))


@pytest.mark.parametrize("opt_state", ["absent", "other"])
def test_component_skips_the_optimizer_state(fsdp_state, tmp_path, opt_state):
  """The checkpoint's optimizer state is absent, or of another optimizer than its
  config names (Adam moments where the config says SGD): resuming training from it
  fails, loading it as a component does not."""
  c, mesh, state = fsdp_state
  other = (optax.adam(1e-3).init(state.params) if opt_state == "other" else {})
  _save(tmp_path, c, TrainState(step=state.step, params=state.params,
                                ema_params=state.ema_params, opt_state=other))
  comp = runs.load(str(tmp_path))
  assert_trees_equal(jax.device_get(comp.params), jax.device_get(state.ema_params))
  task = tasks.make(c, INFO)
  abstract = jax.eval_shape(task.init, jax.random.key(0))
  mngr = checkpoint.manager(str(tmp_path), read_only=True)
  with pytest.raises(Exception):  # the full train state does not match
    checkpoint.restore(mngr, 0, abstract, parallel.state_shardings(mesh, abstract, c.mesh))
  mngr.close()


def test_missing_checkpoint_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    runs.load(str(tmp_path))
  with pytest.raises(ValueError, match="params='best'"):
    runs.load(str(tmp_path), params="best")
