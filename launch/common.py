"""Flags and start-up shared by the entry points: multi-host initialisation, logging,
and turning configuration errors into one clear line instead of a traceback."""
from __future__ import annotations

import json
import logging as pylogging
import os
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


def parse_flags(argv):
  """absl flag parsing with config errors as one line: an unknown key in a
  `--config.a.b=...` override surfaces from ml_collections as an AttributeError."""
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
