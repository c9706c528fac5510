"""Flags and start-up shared by the entry points: multi-host initialisation, logging,
and turning configuration errors into one clear line instead of a traceback."""
from __future__ import annotations

import json
import logging as pylogging
import os
import re
import sys

from absl import flags, logging

from diffusion_jax import parallel

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects TPU pods, "
    "SLURM and Open MPI; set automatically when --coordinator_address is given).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", None, "CPU cross-process collectives ('gloo') for multi-process CPU runs.")

_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "Show orbax/TFDS/grain INFO logs.")

USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


class _QuietLibraries(pylogging.Filter):
  """Keeps orbax's, TFDS's and grain's INFO chatter out of the progress log (their
  warnings and errors still show); --library_logs shows everything."""
  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}", f"{os.sep}grain{os.sep}")

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(s in record.pathname for s in self._NOISY)


def start() -> None:
  """Initialises multi-host JAX when asked to; call first in main()."""
  logging.set_verbosity(logging.INFO)
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  if _DISTRIBUTED.value or _COORDINATOR.value:
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                        _CPU_COLLECTIVES.value)


def resolve_config(value: str) -> str:
  """`--config`'s value as ml_collections' config_flags should load it: an existing file
  as given; otherwise a shipped config's name (`quickstart` or `quickstart.py`, with an
  optional `:arg` for `get_config(arg)`) as that file inside the installed
  `diffusion_jax_configs` package. Raises ValueError naming the value and listing the
  shipped names when it is neither."""
  import importlib.resources
  import diffusion_jax_configs
  path, colon, arg = value.partition(":")
  if os.path.isfile(path):
    return value
  names = diffusion_jax_configs.names()
  name = path[:-3] if path.endswith(".py") else path
  if name in names:
    return f"{importlib.resources.files(diffusion_jax_configs) / f'{name}.py'}{colon}{arg}"
  stem = os.path.basename(name)
  hint = f"; the shipped one is --config={stem}" if stem in names and stem != name else ""
  raise ValueError(f"--config={value}: no such file, and not a shipped config name "
                   f"(shipped: {', '.join(names)}){hint}")


def _resolve_config_args(argv):
  """argv with the value of `--config=V` / `--config V` (one or two dashes; flags
  before a `--` only) passed through `resolve_config`."""
  out, i = list(argv[:1]), 1
  while i < len(argv):
    a = argv[i]
    if a == "--":
      out += argv[i:]
      break
    flag, eq, value = a.partition("=")
    if flag in ("--config", "-config"):
      if eq:
        a = f"{flag}={resolve_config(value)}"
      elif i + 1 < len(argv):
        out.append(a)
        i += 1
        a = resolve_config(argv[i])
    out.append(a)
    i += 1
  return out


def _metric_names(arg: str) -> str:
  """--config.eval.metrics=fd,kid,is → the tuple of those names: ml_collections reads a
  tuple-valued flag as a Python literal, which bare names (and the keyword `is`) are not."""
  flag, eq, value = arg.partition("=")
  if flag.lstrip("-") == "config.eval.metrics" and eq and re.fullmatch(r"[\w\s,]*", value):
    return f"{flag}={tuple(m.strip() for m in value.split(',') if m.strip())!r}"
  return arg


def parse_flags(argv):
  """absl flag parsing with config errors as one line: an unknown key in a
  `--config.a.b=...` override surfaces from ml_collections as an AttributeError.
  `--config=<name>` of a shipped config resolves first (`resolve_config`)."""
  if "config" in flags.FLAGS:
    try:
      argv = _resolve_config_args(argv)
    except ValueError as e:
      fail(e)
  argv = [_metric_names(a) for a in argv]
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)
  except (AttributeError, KeyError) as e:
    detail = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    missing = detail.split("'")[0].split(" ")[0].strip("'\\")
    named = [o for o in overrides if o.split(".")[-1] == missing] or overrides
    fail(f"unknown config key {' '.join(named)}: {detail}")


def fail(error) -> None:
  """Exits with status 1 and the error's message on stderr."""
  print(f"error: {error}", file=sys.stderr)
  sys.exit(1)


def report(workdir: str, name: str, results: dict) -> None:
  """Writes results to <workdir>/eval/<name>.json and prints them as one JSON line
  (process 0 only): the output of the measurement scripts."""
  import jax
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "eval", f"{name}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=2)
  print(json.dumps(results))


def adapter_files(specs) -> list[tuple[str, float]]:
  """[(path, weight), ...] of --adapter FILE[:WEIGHT] flags (weight 1 when absent)."""
  out = []
  for spec in specs or ():
    path, sep, weight = spec.rpartition(":")
    try:
      out.append((path, float(weight)) if sep else (spec, 1.0))
    except ValueError:
      out.append((spec, 1.0))
  return out
