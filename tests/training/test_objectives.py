"""Every family of objective trains on real data: a few steps of the diffusion task for
representative (path, prediction, weighting) combinations, then one sample call."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from diffusion_jax import data
from diffusion_jax.training import loop, tasks

_slow = pytest.mark.slow  # each combination compiles its own step; two run by default
COMBOS = [
    ("ve", "score", "snr", "uniform"),          # NCSN: DSM with λ(σ) = σ²
    ("edm", "edm", "edm", "uniform"),           # EDM preconditioning and weighting
    pytest.param("vp_linear", "v", "min_snr", "logit_normal", marks=_slow),
    pytest.param("sub_vp", "eps", "uniform", "uniform", marks=_slow),
    pytest.param("vp_discrete", "eps", "vlb", "discrete", marks=_slow),  # DDPM's bound weighting
    pytest.param("vp_cosine", "x", "snr", "uniform", marks=_slow),
]


@pytest.mark.parametrize("path,prediction,weight,time_sampling", COMBOS)
def test_objective_trains_and_samples(data_dir, path, prediction, weight, time_sampling):
  c = tiny_config(data_dir, **{"diffusion.path": path, "diffusion.prediction": prediction,
                               "diffusion.loss_weight": weight,
                               "diffusion.time_sampling": time_sampling,
                               "diffusion.t_min": 0.02, "sample.sampler": "ddim",
                               "sample.num_steps": 3, "optim.warmup_steps": 0})
  if path == "edm":
    c.diffusion.sigma_min, c.diffusion.sigma_max = 0.002, 80.0
  info = loop.dataset_info(c)
  task = tasks.get(c.task)
  state = task.init(c, jax.random.key(0), info)
  step = jax.jit(task.train_step(c, info))
  it = data.make_train_iterator(c.data, seed=0)
  losses = []
  for i in range(3):
    state, m = step(state, next(it), jax.random.key(i))
    losses.append(float(m["loss"]))
    assert int(m["nonfinite"]) == 0 and float(m["grad_norm"]) > 0
  assert np.all(np.isfinite(losses))
  images, nfe = jax.jit(task.sample(c, info))(
      state.ema_params, {"label": jnp.arange(4) % 10}, jax.random.split(jax.random.key(9), 4))
  assert images.shape == (4, 8, 8, 1) and np.all(np.isfinite(np.asarray(images)))
  assert nfe == 3 * 2  # CFG: two network passes per step
