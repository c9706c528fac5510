r"""Sampling speed of a config's model: compile time, NFE, seconds per batch, images/s.

  python launch/benchmark_sampling.py --config=configs/quickstart.py [--workdir=RUN] \
      [--samplers=euler,heun,ddim,ddpm,dpm_solver_2m,sde,pc,edm] [--steps=32] \
      [--batch=256] [--repeats=3] [--markdown]

Runs the real path: the task's `generator.sample(sampler=, num_steps=)`
(`tasks.make(config, info)`) compiled by `generate.compile_sampler` and called through
`generate.generate` on the mesh of config.mesh (labels 0..C−1 cycled, conditioning from
`generator.conditioning`; the rest of the sampler settings from config.sample, CFG
included). Parameters are the EMA parameters of --workdir's latest
checkpoint (which must have --config's parameter shapes), else a random init; speed does
not depend on their values. Per sampler, one JSON line (or a markdown table row):

- compile_s: `lower().compile()` of the sampler for this batch (tracing included).
- nfe: network evaluations per sample as the sampler reports it (heun and edm 2N − 1,
  pc N·(1 + corrector steps); CFG doubles it: one call runs the network on [x, x]).
- s_per_batch: median over --repeats calls of `generate.generate` after one untimed
  call; each call ends with the images on the host (which blocks until they are
  ready), so it includes placing the labels and gathering the images. images_per_s:
  batch / s_per_batch.
"""
import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import config as config_lib, parallel, runs, samplers
from diffusion_jax.training import generate, loop, tasks
from diffusion_jax_launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A run of --config whose parameters to "
                               "use (latest checkpoint); default: random init.")
_SAMPLERS = flags.DEFINE_list("samplers", "euler,heun,ddim,ddpm,dpm_solver_2m,sde,pc,edm",
                              "Samplers to time.")
_STEPS = flags.DEFINE_integer("steps", 32, "Sampler steps (num_steps).")
_BATCH = flags.DEFINE_integer("batch", 256, "Images per call (global batch).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per sampler.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print a markdown table, not JSON lines.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["config"])
common.non_empty(_SAMPLERS)
common.integer(_STEPS, 1)
common.integer(_BATCH, 1)
common.integer(_REPEATS, 1)
common.seed(_SEED)


def compile_on_first_call(jitted):
  """(call, timing): call(*args) lowers and compiles `jitted` for its first arguments
  (seconds in timing["compile_s"]), then runs that executable."""
  timing = {}

  def call(*args):
    if "exe" not in timing:
      t0 = time.perf_counter()
      timing["exe"] = jitted.lower(*args).compile()
      timing["compile_s"] = time.perf_counter() - t0
    return timing["exe"](*args)
  return call, timing


def load_params(config, task, mesh, init_key):
  """EMA parameters of --workdir, or of a random init; and where they came from."""
  abstract = jax.eval_shape(task.init, init_key)
  if _WORKDIR.value:
    comp = runs.load(_WORKDIR.value, params="ema", mesh=mesh)
    shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    if shapes(comp.params) != shapes(abstract.ema_params):
      raise ValueError(f"the parameters in {_WORKDIR.value} do not have the shapes of "
                       "--config's model")
    return comp.params, f"{_WORKDIR.value} step {comp.step}"
  shardings = parallel.state_shardings(mesh, abstract, config.mesh)
  state = jax.jit(task.init, out_shardings=shardings)(init_key)
  return state.ema_params, "random init"


def main(argv):
  del argv
  common.start()
  config = _CONFIG.value
  try:
    config_lib.validate(config)
    mesh = parallel.make_mesh(config.mesh)
    info = loop.dataset_info(config)
    task = tasks.make(config, info)
    gen = task.generator
    if gen is None:
      raise ValueError(f"the {config.task!r} task does not sample")
    init_key, _, _ = loop.keys(config.seed)
    for name in _SAMPLERS.value:
      samplers.get(name)  # an unknown name fails here, before any compile
    sample_fns = {name: gen.sample(sampler=name, num_steps=_STEPS.value)
                  for name in _SAMPLERS.value}  # options it cannot use fail here too
    params, source = load_params(config, task, mesh, init_key)
    n = _BATCH.value
    low = config.superres.low_res  # its input's values do not change the speed
    inputs = np.zeros((1, low, low, info.image_shape[-1]), np.float32) if low else None
    cond = gen.conditioning(generate.resolve_labels(gen.num_classes, n), images=inputs)
  except common.USER_ERRORS as e:
    common.fail(e)
  key = jax.random.key(_SEED.value)
  head = {"device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
          "batch": n, "steps": _STEPS.value, "params": source}
  if _MARKDOWN.value:
    print(f"{head['device']} × {head['num_devices']}, batch {n}, {_STEPS.value} steps, "
          f"{source}\n\n| sampler | NFE | compile (s) | s / batch | images/s |\n"
          "|---|---:|---:|---:|---:|", flush=True)
  for name, sample_fn in sample_fns.items():
    nfe = []

    def counted(params, cond, keys, *extra, sample_fn=sample_fn, nfe=nfe):
      images, count = sample_fn(params, cond, keys, *extra)
      nfe.append(int(count))  # a Python int, known when tracing
      return images, count
    call, timing = compile_on_first_call(generate.compile_sampler(counted))
    generate.generate(call, params, cond, key, mesh)  # compile + one untimed run
    times = []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      jax.block_until_ready(generate.generate(call, params, cond, key, mesh))
      times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    row = {"sampler": name, "nfe": nfe[0], "compile_s": round(timing["compile_s"], 2),
           "s_per_batch": round(s, 4), "images_per_s": round(n / s, 1)}
    if _MARKDOWN.value:
      print(f"| {name} | {row['nfe']} | {row['compile_s']:.2f} | {row['s_per_batch']:.3f} | "
            f"{row['images_per_s']:.0f} |", flush=True)
    else:
      print(json.dumps({**row, **head}), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
