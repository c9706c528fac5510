"""Sampler options reach a sampler through one mechanism: config.sample.<sampler> holds
exactly keyword arguments of `samplers.<sampler>`, passed as they are."""
import inspect

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from conftest import tiny_config
from diffusion_jax import config as config_lib, data, samplers
from diffusion_jax.diffusion import paths
from diffusion_jax.training import tasks
from diffusion_jax.training.tasks import diffusion


def test_every_option_section_names_a_sampler_and_its_arguments():
  s = config_lib.base().sample
  sections = {k: v for k, v in s.items() if isinstance(v, ConfigDict)}
  assert set(sections) == {"ddim", "ddpm", "pc", "edm", "unipc", "ipndm"}
  for name, options in sections.items():
    params = inspect.signature(samplers.get(name)).parameters
    assert set(options) <= set(params), (name, sorted(options), sorted(params))
    assert diffusion.sampler_options(s, name) == dict(options)
  assert diffusion.sampler_options(s, "euler") == {}
  s.spacing = "karras"
  assert diffusion.sampler_options(s, "heun") == {"spacing": "karras"}


def test_explicit_times_override_the_spacing_and_parse_from_the_command_line():
  """--config.sample.times='(1.0,0.6,0.3,0.0)' reaches the sampler as spacing=<times>; a
  num_steps that disagrees with it is an error naming both keys."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["prog", "--config.sample.times=(1.0,0.6,0.3,0.0)", "--config.sample.num_steps=3",
          "--config.sample.spacing=karras"]
  fv = flags.FlagValues()  # overrides are read from sys_argv (sys.argv by default)
  config_flags.DEFINE_config_dict("config", config_lib.base(), flag_values=fv, sys_argv=argv)
  fv(argv)
  s = fv.config.sample
  assert s.times == (1.0, 0.6, 0.3, 0.0)
  assert diffusion.sampler_options(s, "unipc") == {"order": 3, "variant": "bh2",
                                                   "spacing": (1.0, 0.6, 0.3, 0.0)}
  s.num_steps = 5
  with pytest.raises(ValueError, match=r"config\.sample\.times.*config\.sample\.num_steps"):
    diffusion.sampler_options(s, "euler")
  # The grid itself is checked when the sampler is built (here against the path).
  path = paths.from_config(config_lib.base().diffusion)
  np.testing.assert_allclose(samplers.spacing.grid(path, 3, (1.0, 0.6, 0.3, 0.0)),
                             [1.0, 0.6, 0.3, 0.0])


def test_an_option_changes_the_samples(data_dir):
  """DDIM's η from config.sample.ddim.eta: η = 1 draws fresh noise at every step, η = 0
  none, so the same keys give different samples."""
  c = tiny_config(data_dir)
  info = data.DatasetInfo((8, 8, 1), 10, 0)
  params = jax.jit(tasks.make(c, info).init)(jax.random.key(0)).params
  # A fresh U-Net outputs zero; perturb it so the prediction depends on x_t.
  params = jax.tree.map(lambda p: p + 0.05, params)
  cond, key = {"label": np.arange(4, dtype=np.int32)}, jax.random.key(1)
  out = {}
  for eta in (0.0, 1.0):
    c.sample.ddim.eta = eta
    gen = tasks.make(c, info).generator
    fn = jax.jit(lambda p, k: gen.sample(sampler="ddim", num_steps=3)(
        p, cond, jax.random.split(k, 4))[0])
    out[eta] = np.asarray(fn(params, key))
  assert np.all(np.isfinite(out[0.0])) and not np.allclose(out[0.0], out[1.0], atol=1e-3)


@pytest.mark.parametrize("path", ["ve", "edm"])
def test_samples_start_from_the_path_s_prior(data_dir, path):
  """x₁ ~ N(0, b(1)²), not N(0, 1): with a network that outputs 0 (all parameters zero)
  an ε-model's one DDIM step from t = 1 returns x̂₀ = x₁/a(1) = x₁ on these paths
  (a = 1). With b(1) = σ_max = 50 nearly every value lies beyond the final clip to
  [-1, 1] (P(|x₁| < 1) ≈ 0.016; from N(0, 1) it would be 0.68)."""
  from diffusion_jax.training import loop
  c = tiny_config(data_dir, **{"diffusion.path": path, "diffusion.prediction": "eps",
                               "sample.sampler": "ddim", "sample.guidance": 0.0})
  task = tasks.make(c, loop.dataset_info(c))
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        jax.eval_shape(task.init, jax.random.key(0)).params)
  keys = jax.random.split(jax.random.key(1), 64)
  x, _ = jax.jit(task.generator.sample(num_steps=1))(
      params, {"label": np.zeros(64, np.int32)}, keys)
  share = float(np.mean(np.abs(np.asarray(x)) < 0.999))
  assert share < 0.05, share
