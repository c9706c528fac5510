"""Test setup: 8 virtual CPU devices for in-process tests, a shared TFDS data dir, and
a tiny config that compiles fast."""
import os

# Before JAX is imported anywhere: 8 virtual CPU devices (sharding tests need them).
# XLA:CPU compile time dominates these tiny runs. LLVM -O0 about halves it; the
# classic loop emitters instead of the new fusion emitters (MLIR) halve it again
# (a tiny U-Net's train step: ~9 s -> ~4 s of CPU). The programs compared against each
# other always use the same flags.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
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


def cli_env(devices: int = 1, optimize: bool = False) -> dict:
  """os.environ for a command-line process with `devices` virtual CPU devices, compiled
  with the test flags (`_FAST_COMPILE`) unless `optimize`."""
  xla = f"--xla_force_host_platform_device_count={devices}" + ("" if optimize else f" {_FAST_COMPILE}")
  return dict(os.environ, XLA_FLAGS=xla, JAX_PLATFORMS="cpu")


def run_cli(script: str, args, *, devices: int = 1, timeout: float = 600, check: bool = True,
            env=None, optimize: bool = False):
  """Runs `launch/<script>.py` in a fresh process with `devices` virtual CPU devices
  (compiled at -O0 unless `optimize`). Returns the CompletedProcess; raises with the
  output tail when check fails."""
  import subprocess
  import sys
  e = dict(cli_env(devices, optimize), **(env or {}))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", f"{script}.py"), *args],
                        capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)
  if check and proc.returncode != 0:
    raise AssertionError(f"{script} {args} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
  return proc


def run_train_in_process(args, *, devices=1, check: bool = True):
  """diffusion-jax-train's own entry point (`launch/train.py`'s `run()`: the same flag
  parsing, main and error handling) in this process, on its first `devices` devices
  (None: all 8, as `run_cli(..., devices=8)`). Saves a fresh interpreter's imports and
  start-up (~5 s a run). Its programs are those of a 1-device command line, but the
  compilation cache key includes the process's device count, so they are shared
  only with other runs in this process; and results are close to a 1-device
  process's, not bitwise (XLA:CPU partitions its threads by the device count), so
  runs compared bitwise are both one or the other. Returns a CompletedProcess
  (returncode from SystemExit, stdout and stderr as the command line prints them,
  absl's log lines aside). The real process boundary (signals, exit status, console
  script) is tests/test_cli.py's."""
  import contextlib
  import functools
  import io
  import subprocess
  import sys
  from unittest import mock

  import jax
  from absl import flags, logging
  from diffusion_jax.training import loop
  from diffusion_jax_launch import train
  argv = [os.path.join(ROOT, "launch", "train.py"), *map(str, args)]
  # A fresh parse, as in a new process (ml_collections defines the --config.<key>
  # override flags while parsing: they go too).
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  out, err, code = io.StringIO(), io.StringIO(), 0
  verbosity = logging.get_verbosity()
  train_on = loop.train if devices is None else functools.partial(
      loop.train, devices=jax.devices()[:devices])
  with mock.patch.object(sys, "argv", argv), mock.patch.object(loop, "train", train_on), \
       contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      train.run()
    except SystemExit as e:
      code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
      logging.set_verbosity(verbosity)
  proc = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
  if check and code != 0:
    raise AssertionError(f"train {args} exited {code}:\n{proc.stderr[-4000:]}")
  return proc


def quickstart_args(workdir, data_dir, *extra):
  """Command-line args for the tiny quickstart-shaped run."""
  return [f"--config={os.path.join(ROOT, 'configs', 'quickstart.py')}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *TINY_FLAGS, *extra]


def read_metrics(workdir):
  """The rows of <workdir>/metrics.jsonl (`writers.read_metrics`)."""
  from diffusion_jax import writers
  return writers.read_metrics(workdir)


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


@pytest.fixture(scope="session")
def tiny_teacher(data_dir, tmp_path_factory):
  """A 4-step tiny class-conditional rectified-flow run (`tiny_config`): the teacher of
  the distillation tests (its quality is irrelevant; its parameters are what they read)."""
  from diffusion_jax.training import loop
  workdir = str(tmp_path_factory.mktemp("teacher"))
  loop.train(tiny_config(data_dir, **{"train.num_steps": 4}), workdir)
  return workdir


def distill_config(data_dir: str, teacher: str, task: str, **overrides):
  """`tiny_config` as the student of `teacher` (the same network and path)."""
  return tiny_config(data_dir, **{"task": task, "distill.teacher": teacher, **overrides})


@pytest.fixture(scope="session")
def tiny_clip(data_dir, tmp_path_factory):
  """A clip run of configs/digits_clip.py trained 10 steps: the text encoder of tiny
  text-to-image tests (its quality is irrelevant)."""
  import importlib
  from diffusion_jax.training import loop
  c = importlib.import_module("diffusion_jax_configs.digits_clip").get_config()
  c.data.data_dir = data_dir
  c.data.batch_size = 16
  c.train.update(num_steps=10, log_every=5, checkpoint_every=10)
  workdir = str(tmp_path_factory.mktemp("clip"))
  loop.train(c, workdir)
  return workdir


def tiny_t2i_config(data_dir: str, clip_workdir: str, **overrides):
  """`tiny_config` as a caption-only text-to-image U-Net (cross-attention to the
  tiny clip run's text encoder)."""
  return tiny_config(data_dir, **{"model.class_conditional": False, "text.encoder": "clip",
                                  "text.clip_workdir": clip_workdir, **overrides})
