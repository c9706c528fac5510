"""train.parallel='pmap' through diffusion-jax-train's entry point (`launch/train.py`'s
flag parsing and main, in this process): the same step body compiled with jax.pmap (2
devices, gradients averaged by lax.pmean) logs the same losses and ends with the same
parameters as the jit path (1 device)."""
import ast

import jax
import numpy as np
import pytest

from conftest import TINY_FLAGS, assert_trees_equal, load_state, quickstart_args, read_metrics
from conftest import run_train_in_process
from diffusion_jax.training import loop
from diffusion_jax_configs import quickstart

SGD = ["--config.optim.name=sgd", "--config.optim.lr=0.05", "--config.optim.schedule=constant",
       "--config.optim.warmup_steps=0", "--config.train.num_steps=4",
       "--config.train.checkpoint_every=4", "--config.sample.per_class=0"]


def _as_config(data_dir, flags):
  """configs/quickstart.py with `--config.k=v` flags applied, as the command line does."""
  c = quickstart.get_config()
  c.data.data_dir = data_dir
  for flag in flags:
    key, value = flag[len("--config."):].split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a string
    c.update_from_flattened_dict({key: value})
  return c


@pytest.mark.slow  # ~28 s; pmap == jit in process is tests/training/test_pmap.py's (default)
def test_pmap_command_line_equals_jit(data_dir, tmp_path):
  run_train_in_process(quickstart_args(tmp_path / "pmap", data_dir,
                                       "--config.train.parallel=pmap", *SGD), devices=2)
  loop.train(_as_config(data_dir, TINY_FLAGS + SGD), str(tmp_path / "jit"),
             devices=jax.devices()[:1])
  got, want = read_metrics(tmp_path / "pmap"), read_metrics(tmp_path / "jit")
  assert [m["step"] for m in got] == [m["step"] for m in want] == [2, 4]
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose([m[key] for m in got], [m[key] for m in want], rtol=1e-5,
                               err_msg=key)
  assert_trees_equal(load_state(tmp_path / "pmap"), load_state(tmp_path / "jit"),
                     rtol=1e-5, atol=1e-6)
