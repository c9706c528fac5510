r"""Progressive distillation as a chain of runs (Salimans & Ho 2022, Algorithm 2):
N → N/2 → … → end, each round's student the next one's teacher.

  python launch/progressive.py --config=configs/digits_progressive.py \
      --teacher=/tmp/quickstart --workdir=/tmp/progressive \
      [--start_steps=16] [--end_steps=1] [--config.train.num_steps=400 ...]

Round k trains `diffusion-jax-train` with --config.distill.teacher=<previous workdir>
and --config.sample.num_steps=N_k into <workdir>/steps_<N_k>; other --config.* flags
and the multi-host flags (--distributed, --coordinator_address, --num_processes,
--process_id, --cpu_collectives, --single_process) apply to every round. Re-running the command resumes the chain where it stopped (a
finished round's train command returns at once; an interrupted one resumes from its
checkpoint). Prints one JSON line per round (steps, workdir, teacher, seconds).
"""
import json
import os
import subprocess
import sys
import time

from absl import flags

from diffusion_jax import io

_CONFIG = flags.DEFINE_string("config", None, "A progressive-distillation config file.")
_TEACHER = flags.DEFINE_string("teacher", None, "Workdir of the first round's teacher.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the chain's runs.")
_START = flags.DEFINE_integer("start_steps", 16, "Student steps of the first round (N).")
_END = flags.DEFINE_integer("end_steps", 1, "Student steps of the last round.")
flags.mark_flags_as_required(["config", "teacher", "workdir"])
flags.register_multi_flags_validator(
    ["start_steps", "end_steps"], lambda v: _halves(v["start_steps"], v["end_steps"]))


# Passed on to every round's diffusion-jax-train: config overrides, and the multi-host
# flags (launch/common.py), so a chain runs under SLURM or on a pod like one run.
PASSTHROUGH = ("--config.", "--distributed", "--nodistributed", "--coordinator_address",
               "--num_processes", "--process_id", "--cpu_collectives", "--single_process",
               "--nosingle_process")


def rounds(start: int, end: int) -> list[int]:
  """[start, start/2, …, end]; start/end must be powers of two apart."""
  if start < 1 or end < 1 or start < end:
    raise ValueError(f"--start_steps={start}, --end_steps={end}: need start ≥ end ≥ 1")
  out, n = [], start
  while n >= end:
    out.append(n)
    if n == end:
      return out
    if n % 2:
      raise ValueError(f"--start_steps={start} does not halve down to --end_steps={end}")
    n //= 2
  raise ValueError(f"--start_steps={start} does not halve down to --end_steps={end}")


def _halves(start: int, end: int) -> bool:
  """`rounds`' check as a flag validator (at parse time)."""
  try:
    return bool(rounds(start, end))
  except ValueError as e:
    raise flags.ValidationError(str(e)) from e


def main(passthrough):
  steps = rounds(_START.value, _END.value)
  train = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")]
  teacher = _TEACHER.value
  for n in steps:
    workdir = os.fspath(io.path(_WORKDIR.value) / f"steps_{n}")
    start = time.time()
    subprocess.run(train + [f"--config={_CONFIG.value}", f"--workdir={workdir}",
                            f"--config.distill.teacher={teacher}",
                            f"--config.sample.num_steps={n}", *passthrough], check=True)
    print(json.dumps({"steps": n, "workdir": workdir, "teacher": teacher,
                      "seconds": round(time.time() - start, 1)}), flush=True)
    teacher = workdir


def run():
  try:  # parsing runs the flags' validators
    rest = flags.FLAGS(sys.argv, known_only=True)[1:]  # the --config.* overrides stay
  except flags.Error as e:
    sys.exit(f"error: {e}")
  unknown = [a for a in rest if not a.startswith(PASSTHROUGH)]
  if unknown:
    sys.exit(f"error: unknown arguments {unknown} (only --config.* overrides and the "
             "multi-host flags of diffusion-jax-train pass through)")
  main(rest)


if __name__ == "__main__":
  run()
