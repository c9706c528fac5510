"""Test setup: 8 virtual CPU devices for in-process tests, a shared TFDS data dir, and
a tiny config that compiles fast."""
import os

# Before JAX is imported anywhere: 8 virtual CPU devices (sharding tests need them).
# LLVM -O0: XLA:CPU compile time dominates these tiny runs (about halved); the
# programs compared against each other always use the same flags.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {_FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by this process and every command-line
# run the tests start: the same tiny programs compile once per machine, not per run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(__import__("tempfile").gettempdir(), "diffusion_jax_jit_cache"))

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One prepared TFDS directory (embedded datasets) for the whole session."""
  from diffusion_jax import data
  d = str(tmp_path_factory.mktemp("tfds"))
  data.prepare("sklearn_digits", d)
  return d


def tiny_config(data_dir: str, **overrides):
  """A quickstart-shaped config with a tiny U-Net: compiles in seconds."""
  from diffusion_jax.config import base
  c = base()
  c.data.name = "sklearn_digits"
  c.data.data_dir = data_dir
  c.data.batch_size = 16
  c.model.channels = 8
  c.model.channel_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.num_heads = 2
  c.sample.num_steps = 4
  c.sample.per_class = 1
  c.optim.warmup_steps = 2
  c.train.num_steps = 8
  c.train.log_every = 2
  c.train.checkpoint_every = 4
  c.train.sample_every = 0
  for k, v in overrides.items():
    c.update_from_flattened_dict({k: v})
  return c


# Flags for the command line with the same tiny model.
TINY_FLAGS = [
    "--config.data.batch_size=16", "--config.model.channels=8",
    "--config.model.channel_mult=(1,2)", "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=(4,)", "--config.model.num_heads=2",
    "--config.sample.num_steps=4", "--config.sample.per_class=1",
    "--config.optim.warmup_steps=2", "--config.train.log_every=2",
]


def run_cli(script: str, args, *, devices: int = 1, timeout: float = 600, check: bool = True,
            env=None, optimize: bool = False):
  """Runs `launch/<script>.py` in a fresh process with `devices` virtual CPU devices
  (compiled at -O0 unless `optimize`). Returns the CompletedProcess; raises with the
  output tail when check fails."""
  import subprocess
  import sys
  xla = f"--xla_force_host_platform_device_count={devices}" + ("" if optimize else f" {_FAST_COMPILE}")
  e = dict(os.environ, XLA_FLAGS=xla, JAX_PLATFORMS="cpu", **(env or {}))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", f"{script}.py"), *args],
                        capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} {args} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
  return proc


def quickstart_args(workdir, data_dir, *extra):
  """Command-line args for the tiny quickstart-shaped run."""
  return [f"--config={os.path.join(ROOT, 'configs', 'quickstart.py')}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *TINY_FLAGS, *extra]


def read_metrics(workdir):
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def load_state(workdir, step=None):
  """(params, ema_params) of a run's checkpoint as numpy pytrees."""
  import jax
  from diffusion_jax import runs
  return tuple(jax.device_get(runs.load(str(workdir), step=step, params=p).params)
               for p in ("raw", "ema"))


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
  import jax
  import numpy as np
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    if rtol == 0 and atol == 0:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
