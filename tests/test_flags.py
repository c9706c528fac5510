"""Every numeric flag of every command line is checked when the command line is parsed:
a value that cannot work (out of range, nan or ±inf, an empty or unparseable list) stops
the command before any work with one line naming the flag, exit status 1.

All launchers' flags are parsed in one fresh process (`_DRIVER`: each launcher imported
in turn, its flags removed again before the next, since they share absl's FLAGS), and
two real console scripts show the same line and exit status."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cli_env

CONFIG = os.path.join(ROOT, "configs", "quickstart.py")
SAMPLE = ["--workdir=/nonexistent/run", "--output=/nonexistent/out.npz"]
ENCODE = ["--autoencoder=/nonexistent/ae", "--dataset=sklearn_digits", "--output_dir=/nonexistent/o"]
IMAGES = ["--input=/nonexistent/in", "--output=/nonexistent/out"]
RUN = ["--workdir=/nonexistent/run"]
BENCH = [f"--config={CONFIG}"]
PROGRESSIVE = ["--config=c.py", "--teacher=/nonexistent/t", "--workdir=/nonexistent/w"]

# (launcher, arguments, the flag whose value is refused)
BAD = [
    ("sample", SAMPLE + ["--num_samples=0"], "num_samples"),
    ("sample", SAMPLE + ["--steps=-1"], "steps"),
    ("sample", SAMPLE + ["--guidance=nan"], "guidance"),
    ("sample", SAMPLE + ["--lora_scale=inf"], "lora_scale"),
    ("sample", SAMPLE + ["--classifier_scale=-inf"], "classifier_scale"),
    ("sample", SAMPLE + ["--strength=0"], "strength"),
    ("sample", SAMPLE + ["--strength=1.5"], "strength"),
    ("sample", SAMPLE + ["--labels=0,x"], "labels"),
    ("sample", SAMPLE + ["--labels="], "labels"),
    ("sample", SAMPLE + ["--labels=-1"], "labels"),
    ("sample", SAMPLE + ["--adapter=a.safetensors:nan"], "adapter"),
    ("sample", SAMPLE + ["--seed=4294967296"], "seed"),
    ("sample", SAMPLE + ["--step=-1"], "step"),
    ("sample", SAMPLE + ["--interpolation_points=1"], "interpolation_points"),
    ("sample", SAMPLE + ["--num_processes=0"], "num_processes"),
    ("sample", SAMPLE + ["--num_processes=2", "--process_id=2"], "process_id"),
    ("sample", SAMPLE + ["--coordinator_address=10.0.0.1"], "coordinator_address"),
    ("evaluate", RUN + ["--step=-1"], "step"),
    ("encode", ENCODE + ["--batch_size=0"], "batch_size"),
    ("encode", ENCODE + ["--chunk_size=0"], "chunk_size"),
    ("encode", ENCODE + ["--image_size=-8"], "image_size"),
    ("images", IMAGES + ["--image_size=-1"], "image_size"),
    ("images", IMAGES + ["--num_classes=-1"], "num_classes"),
    ("quickstart", ["--per_class=0"], "per_class"),
    ("quickstart", ["--seed=-1"], "seed"),
    ("class_accuracy", RUN + ["--num_samples=0"], "num_samples"),
    ("class_accuracy", RUN + ["--guidance=inf"], "guidance"),
    ("clip_retrieval", RUN + ["--step=-2"], "step"),
    ("gan_modes", RUN + ["--num_samples=0"], "num_samples"),
    ("measure_finetuning", RUN + ["--concept_label=10"], "concept_label"),
    ("measure_finetuning", RUN + ["--num_concept=0"], "num_concept"),
    ("measure_finetuning", RUN + ["--lora_scale=nan"], "lora_scale"),
    ("measure_finetuning", RUN + ["--adapter=:0.5"], "adapter"),
    ("measure_text_to_image", RUN + ["--per_prompt=0"], "per_prompt"),
    ("benchmark_sampling", BENCH + ["--samplers="], "samplers"),
    ("benchmark_sampling", BENCH + ["--batch=0"], "batch"),
    ("benchmark_sampling", BENCH + ["--repeats=0"], "repeats"),
    ("benchmark_train", BENCH + ["--steps=0"], "steps"),
    ("benchmark_train", BENCH + ["--peak_tflops=nan"], "peak_tflops"),
    ("benchmark_train", BENCH + ["--synthetic=32,32"], "synthetic"),
    ("benchmark_train", BENCH + ["--synthetic=32,0,4"], "synthetic"),
    ("benchmark_samplers", ["--n=0"], "n"),
    ("benchmark_samplers", ["--spacing=linear"], "spacing"),
    ("benchmark_solvers", ["--n=0"], "n"),
    ("progressive", PROGRESSIVE + ["--start_steps=12", "--end_steps=5"], "start_steps"),
    ("progressive", PROGRESSIVE + ["--end_steps=0"], "end_steps"),
]

# Values at the edges of what works: they must parse.
GOOD = [
    ("sample", SAMPLE + ["--labels=0,3", "--seed=4294967295", "--guidance=-1.5", "--strength=1",
                         "--lora_scale=0", "--step=0", "--interpolation_points=2",
                         "--adapter=gs://b/run/adapters/10.safetensors",
                         "--adapter=/tmp/a.safetensors:0.5", "--num_processes=2",
                         "--process_id=1", "--coordinator_address=[::1]:1234"]),
    ("encode", ENCODE + ["--image_size=0", "--batch_size=1", "--chunk_size=1"]),
    ("measure_finetuning", RUN + ["--concept_label=0", "--adapter=x.safetensors:-1"]),
    ("benchmark_train", BENCH + ["--synthetic=32,32,4", "--peak_tflops=989.4",
                                 "--synthetic_classes=0"]),
    ("benchmark_samplers", ["--spacing=karras"]),
    ("progressive", PROGRESSIVE + ["--start_steps=16", "--end_steps=2"]),
]

# Imports each launcher in turn and parses its cases as its entry point does (common's
# parse_flags; absl's own parser for the scripts that use app.run's default, and for
# progressive); prints one JSON result per case, with whether parsing started a JAX
# backend (benchmark_samplers' and benchmark_solvers' test mixture computes at import).
_DRIVER = r"""
import contextlib, io, json, sys, time
from absl import flags
from jax._src import xla_bridge
from diffusion_jax_launch import common
OWN_PARSER = ("benchmark_samplers", "benchmark_solvers", "progressive")
cases, results = json.load(sys.stdin), []
by_module = {}
for i, (module, args) in enumerate(cases):
  by_module.setdefault(module, []).append((i, args))
for module, items in by_module.items():
  before = set(flags.FLAGS)
  __import__(f"diffusion_jax_launch.{module}")
  for i, args in items:
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    started, err, code, t0 = xla_bridge.backends_are_initialized(), io.StringIO(), 0, time.perf_counter()
    with contextlib.redirect_stderr(err):
      try:
        if module in OWN_PARSER:
          flags.FLAGS([module, *args], known_only=True)
        else:
          common.parse_flags([module, *args])
      except flags.Error as e:
        code, err = 1, io.StringIO(f"{e}\n")
      except SystemExit as e:
        code = e.code
    results.append((i, {"code": code, "stderr": err.getvalue(),
                        "seconds": time.perf_counter() - t0,
                        "jax_started": xla_bridge.backends_are_initialized() and not started}))
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
print(json.dumps([r for _, r in sorted(results)]))
"""


@pytest.fixture(scope="module")
def parsed():
  cases = [(m, a) for m, a, _ in BAD] + [(m, a) for m, a in GOOD]
  proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(cases),
                        capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  return results[:len(BAD)], results[len(BAD):]


@pytest.mark.parametrize("index", range(len(BAD)),
                         ids=[f"{m}-{' '.join(a[-2:] if f == 'process_id' else a[-1:])}"
                              for m, a, f in BAD])
def test_bad_value_stops_at_parse_naming_the_flag(parsed, index):
  module, args, flag = BAD[index]
  r = parsed[0][index]
  assert r["code"] == 1, r
  lines = r["stderr"].strip().splitlines()
  assert len(lines) == 1 and f"{flag}=" in lines[0], r["stderr"]
  assert lines[0].startswith("flag" if module in ("benchmark_samplers", "benchmark_solvers",
                                                   "progressive") else "error: flag"), lines
  assert "must" in lines[0] or "halve" in lines[0] or "need" in lines[0], lines
  assert r["seconds"] < 1.0 and not r["jax_started"], r


@pytest.mark.parametrize("index", range(len(GOOD)), ids=[m for m, _ in GOOD])
def test_values_that_work_parse(parsed, index):
  r = parsed[1][index]
  assert (r["code"], r["stderr"]) == (0, ""), (GOOD[index], r)


def test_console_scripts_stop_with_one_line(tmp_path):
  """The installed entry points, as a user runs them (both at once: they only import)."""
  bin_dir = os.path.dirname(sys.executable)
  out = tmp_path / "out.npz"
  runs = {
      "num_samples": [os.path.join(bin_dir, "diffusion-jax-sample"), f"--workdir={tmp_path}",
                      f"--output={out}", "--num_samples=0"],
      "end_steps": [os.path.join(bin_dir, "diffusion-jax-progressive"), "--config=c.py",
                    "--teacher=t", f"--workdir={tmp_path / 'chain'}", "--start_steps=8",
                    "--end_steps=3"],
  }
  procs = {flag: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=cli_env(), cwd=tmp_path)
           for flag, argv in runs.items()}
  for flag, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert stderr.startswith("error: flag") and f"{flag}=" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and stdout == "", stderr
  assert sorted(os.listdir(tmp_path)) == []
