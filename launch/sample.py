r"""Sample from a trained run (EMA parameters by default).

  diffusion-jax-sample --workdir=/tmp/run --num_samples=64 --output=samples.npz \
      [--labels=0,1,2] [--sampler=ddim] [--steps=50] [--guidance=2] [--seed=0] [--grid]

Writes `images` (uint8 [N, H, W, C]) and `labels` (int32 [N]; -1 for unconditional
models) to the .npz, and with --grid a PNG beside it. Deterministic for a given seed,
whatever the number of devices.
"""
import os

import jax
import numpy as np
from absl import app, flags, logging

from diffusion_jax import checkpoint, config as config_lib, data, io, parallel
from diffusion_jax.training import generate, tasks
from diffusion_jax_launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by diffusion-jax-train.")
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of samples N.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz path.")
_LABELS = flags.DEFINE_list("labels", None, "Class labels, cycled to N (default: 0,1,...,C-1 cycled).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG weight w (default: config.sample.guidance).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_GRID = flags.DEFINE_bool("grid", False, "Also write a PNG grid next to --output.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA.")
flags.mark_flags_as_required(["workdir", "output"])


def sample(workdir, num_samples, output, labels=None, sampler=None, steps=None,
           guidance=None, seed=0, grid=False, step=None, use_ema=True):
  """Library form of the command; returns (images uint8 [N,H,W,C], labels [N])."""
  mngr = checkpoint.manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  meta = checkpoint.read_meta(mngr, step)
  config = config_lib.from_json(meta["config"])
  info = data.DatasetInfo(image_shape=tuple(meta["dataset"]["image_shape"]),
                          num_classes=meta["dataset"]["num_classes"], num_examples=0)
  task = tasks.get(config.task)
  mesh = parallel.make_mesh(config_lib.base().mesh)  # all devices, data parallel
  abstract = jax.eval_shape(lambda k: task.init(config, k, info), jax.random.key(0))
  state, _, _ = checkpoint.restore(mngr, step, abstract, parallel.state_shardings(
      mesh, abstract, config.mesh))
  if info.num_classes:
    pool = [int(l) for l in labels] if labels else list(range(info.num_classes))
    bad = [l for l in pool if not 0 <= l < info.num_classes]
    if bad:
      raise ValueError(f"--labels {bad} out of range for {info.num_classes} classes")
    y = np.resize(np.asarray(pool, np.int32), num_samples)
  else:
    if labels:
      raise ValueError("--labels given, but this model is unconditional")
    y = np.zeros(num_samples, np.int32)
  sample_fn = task.sample(config, info, sampler=sampler, num_steps=steps, guidance=guidance)
  params = state.ema_params if use_ema else state.params
  images = generate.generate(generate.compile_sampler(sample_fn), params, y,
                             jax.random.key(seed), mesh)
  images = io.to_uint8(images)
  out_labels = y if info.num_classes else np.full(num_samples, -1, np.int32)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    np.savez(output, images=images, labels=out_labels)
    logging.info("Wrote %d samples (checkpoint step %d) to %s", num_samples, step, output)
    if grid:
      rows = int(np.ceil(np.sqrt(num_samples)))
      png = io.save_png(os.path.splitext(output)[0] + ".png", io.grid(images, rows),
                        upscale=max(1, 64 // images.shape[1]))
      logging.info("Wrote grid to %s", png)
  mngr.close()
  return images, out_labels


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    sample(_WORKDIR.value, _NUM.value, _OUTPUT.value, _LABELS.value, _SAMPLER.value,
           _STEPS.value, _GUIDANCE.value, _SEED.value, _GRID.value, _STEP.value,
           use_ema=not _RAW.value)
  except common.USER_ERRORS as e:
    common.fail(e)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
