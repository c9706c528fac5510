"""Flags and start-up shared by the entry points: multi-host initialisation, logging,
and turning configuration errors into one clear line instead of a traceback."""
from __future__ import annotations

import json
import logging as pylogging
import math
import os
import re
import sys

from absl import flags, logging

from diffusion_jax import io, parallel

_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects TPU pods, "
    "SLURM and Open MPI; set automatically when --coordinator_address is given).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", None, "CPU cross-process collectives ('gloo') for multi-process CPU runs.")
_SINGLE_PROCESS = flags.DEFINE_bool(
    "single_process", False, "Run as one process where the environment announces several "
    "(SLURM, Open MPI, a TPU slice): without it such a start stops unless --distributed.")

_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "Show orbax/TFDS/grain INFO logs.")

USER_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)


class _QuietLibraries(pylogging.Filter):
  """Keeps orbax's, TFDS's and grain's INFO chatter out of the progress log (their
  warnings and errors still show); --library_logs shows everything."""
  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}", f"{os.sep}grain{os.sep}",
            f"{os.sep}fsspec{os.sep}", f"{os.sep}gcsfs{os.sep}")

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(s in record.pathname for s in self._NOISY)


def multi_process_launch(env) -> str | None:
  """Why the environment `env` (a mapping like os.environ) says this process is one of
  several, naming the variable and its value; None when it does not. Reads what
  jax.distributed.initialize() reads to detect a cluster (jax/_src/clusters/): SLURM's
  task count (SLURM_STEP_NUM_TASKS inside an srun step, else SLURM_NTASKS), Open MPI's
  OMPI_COMM_WORLD_SIZE, MPICH's and Intel MPI's PMI_SIZE (jax's mpi4py route), and a TPU
  slice's host list (TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES, as GKE sets them) or
  slice count (MEGASCALE_NUM_SLICES). A TPU VM that keeps its topology only in the GCE
  metadata server is not seen: that would need a network query."""
  slurm = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
  for var, launcher in ((slurm, "SLURM"), ("OMPI_COMM_WORLD_SIZE", "Open MPI"),
                        ("PMI_SIZE", "an MPI launcher (PMI)")):
    value = env.get(var, "").strip()
    if value.isdigit() and int(value) > 1:
      return f"{launcher} started this process as one of {int(value)} ({var}={value})"
  slices = env.get("MEGASCALE_NUM_SLICES", "").strip()
  if slices.isdigit() and int(slices) > 1:
    return f"this process runs in a TPU job of {int(slices)} slices (MEGASCALE_NUM_SLICES={slices})"
  for var in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    hosts = [h for h in env.get(var, "").split(",") if h.strip()]
    if len(hosts) > 1:
      return f"this process runs on a TPU slice of {len(hosts)} hosts ({var}={env[var]})"
    if var in env:
      break  # jax reads the first of the two that is set
  return None


def launch_error(env, distributed: bool, single_process: bool) -> str | None:
  """The launch guard: the error for a process that the environment starts as one of
  several (`multi_process_launch`) but that would not join the others (no --distributed
  nor --coordinator_address), unless --single_process says one process is intended; or
  for --single_process together with --distributed. None when the start is consistent."""
  if single_process:
    return ("--single_process contradicts --distributed / --coordinator_address: pass one "
            "or the other") if distributed else None
  reason = None if distributed else multi_process_launch(env)
  if reason is None:
    return None
  return (f"{reason}, but without --distributed it does not join them: jax.distributed is "
          "not initialised (on GPUs and CPUs each process then takes itself for process 0 "
          "and writes the same checkpoints and metrics). Pass --distributed "
          "(jax.distributed.initialize() then reads this environment) or "
          "--coordinator_address=HOST:PORT --num_processes=N --process_id=I; or "
          "--single_process if one process is intended.")


def start() -> None:
  """Initialises multi-host JAX when asked to; call first in main(). Stops with the
  launch guard's error (`launch_error`) before any work when the environment announces
  several processes and the flags neither join them nor say one is intended."""
  logging.set_verbosity(logging.INFO)
  if not _LIBRARY_LOGS.value:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed = bool(_DISTRIBUTED.value or _COORDINATOR.value)
  error = launch_error(os.environ, distributed, _SINGLE_PROCESS.value)
  if error:
    fail(error)
  if distributed:
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
  """Writes results to <workdir>/eval/<name>.json (atomically; local or cloud) and
  prints them as one JSON line (process 0 only): the output of the measurement
  scripts."""
  import jax
  if jax.process_index() != 0:
    return
  io.write_atomic(io.path(workdir) / "eval" / f"{name}.json", json.dumps(results, indent=2))
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


# Up-front checks of flag values, registered by each launcher next to its flags'
# definitions: absl runs every validator when the command line is parsed, before any
# work, and `parse_flags` prints a failure as one line naming the flag (`error: flag
# --steps=0: must be >= 1`). A flag left at a None default (not given) passes.

SEED_LIMIT = 2**32  # JAX keeps 32 bits of an integer seed: key(s + 2**32) is key(s)


def integer(flag, low: int, high: int | None = None) -> None:
  """An integer flag in [low, high] (high: no upper bound when None)."""
  message = f"must be >= {low}" if high is None else f"must be in [{low}, {high}]"
  flags.register_validator(
      flag, lambda v: v is None or (v >= low and (high is None or v <= high)), message)


def seed(flag) -> None:
  """A PRNG seed: an integer in [0, 2**32) (larger ones repeat JAX's keys)."""
  flags.register_validator(flag, lambda v: v is None or 0 <= v < SEED_LIMIT,
                           "must be in [0, 2**32) (a JAX seed keeps 32 bits)")


def number(flag, low: float | None = None, high: float | None = None, *,
           open_low: bool = False) -> None:
  """A float flag that is finite (not nan or ±inf), and in [low, high] where given
  ((low, high] with open_low)."""
  if low is not None and high is not None:
    message = f"must be in {'(' if open_low else '['}{low:g}, {high:g}]"
  elif low is not None:
    message = f"must be a finite number {'>' if open_low else '>='} {low:g}"
  else:
    message = "must be a finite number"

  def check(v):
    if v is None:
      return True
    above = low is None or (v > low if open_low else v >= low)
    return math.isfinite(v) and above and (high is None or v <= high)
  flags.register_validator(flag, check, message)


def non_empty(flag) -> None:
  """A list flag that, when given, names at least one item and no empty one."""
  flags.register_validator(flag, lambda v: v is None or (bool(v) and all(s.strip() for s in v)),
                           "must be a comma-separated list of one or more items")


def int_list(flag, low: int = 0, length: int | None = None) -> None:
  """A list flag of integers >= low (exactly `length` of them where given)."""
  what = f"{length} " if length else "one or more "
  message = f"must be {what}comma-separated integers >= {low}"

  def check(v):
    if v is None:
      return True
    try:
      ints = [int(s) for s in v]
    except ValueError:
      return False
    return bool(ints) and all(i >= low for i in ints) and length in (None, len(ints))
  flags.register_validator(flag, check, message)


def adapter_specs(flag) -> None:
  """--adapter FILE[:WEIGHT] (repeatable): a file name, and a finite weight where given
  (as `adapter_files` reads them)."""
  flags.register_validator(
      flag, lambda v: all(p and math.isfinite(w) for p, w in adapter_files(v)),
      "must be FILE or FILE:WEIGHT with a finite WEIGHT")


def _port(address) -> bool:
  host, _, port = (address or "").rpartition(":")
  return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


# This module's own flags (the multi-host start-up, `start`).
integer(_NUM_PROCESSES, 1)
integer(_PROCESS_ID, 0)
flags.register_multi_flags_validator(
    ["num_processes", "process_id"],
    lambda v: None in v.values() or v["process_id"] < v["num_processes"],
    "--process_id must be < --num_processes (processes count from 0)")
flags.register_validator(_COORDINATOR, lambda v: v is None or _port(v),
                         "must be HOST:PORT with a port in [1, 65535]")
