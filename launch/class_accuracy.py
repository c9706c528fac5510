r"""Class accuracy of a class-conditional run: do its samples show the requested class?

  python launch/class_accuracy.py --workdir=/tmp/run [--num_samples=1000] [--seed=0] \
      [--data_dir=DIR] [--step=N] [--raw_params] [--sampler=ddim] [--steps=50] [--guidance=2]

Samples N images with labels 0..C−1 cycled (EMA parameters by default; the sampler
flags pass through to diffusion runs, a GAN takes none), trains the domain classifier
(`evaluation/classifier.py`: an MLP on pixels, on the run's dataset train split only)
and prints one JSON line:

  classifier_test_accuracy   the classifier on the real test split (its own ceiling)
  sample_accuracy            fraction of samples classified as their requested label
  per_class                  sample_accuracy of each label 0..C−1
  num_samples, checkpoint_step, task, seed (and sampler, steps, guidance for diffusion)

The same object is written to <workdir>/eval/class_accuracy_<step>.json.
Unconditional runs (config.model.class_conditional=False and no text conditioning)
are an error.
"""

import jax
import numpy as np
from absl import app, flags

from diffusion_jax import data, runs
from diffusion_jax.evaluation import classifier
from diffusion_jax.training import generate, tasks
from diffusion_jax_launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by diffusion-jax-train.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Number of samples N (labels 0..C-1 cycled).")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "TFDS data dir of the real images (default: the run's).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG weight w (default: config.sample.guidance).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA.")
flags.mark_flags_as_required(["workdir"])
common.integer(_NUM, 1)
common.integer(_STEPS, 1)
common.number(_GUIDANCE)
common.seed(_SEED)
common.integer(_STEP, 0)


def _conditional_run(workdir: str, step):
  """(config, info, step, generator) of a run whose samples are conditioned on its dataset's
  classes (its generator's num_classes: by label or by caption); ValueError otherwise."""
  config, info, step = runs.read(workdir, step)
  generator = tasks.make(config, info).generator
  if generator is None:
    raise ValueError(f"{workdir} holds a config.task={config.task!r} run, which generates "
                     "nothing")
  if not info.num_classes or generator.num_classes != info.num_classes:
    why = (f"{config.data.name!r} has no labels" if not info.num_classes else
           "config.model.class_conditional=False and no config.text.encoder")
    raise ValueError(f"{workdir} holds an unconditional {config.task!r} run ({why}): "
                     "class accuracy needs a class-conditional model")
  return config, info, step, generator


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    config, info, step, generator = _conditional_run(_WORKDIR.value, _STEP.value)
    images, labels, _ = generate.sample_run(
        _WORKDIR.value, _NUM.value, seed=_SEED.value, sampler=_SAMPLER.value,
        num_steps=_STEPS.value, guidance=_GUIDANCE.value, step=step,
        use_ema=not _RAW.value)
    if jax.process_index() != 0:
      return
    name, data_dir, image_size, _ = data.pictures(config.data, info)  # a cache's: its source
    data_dir = _DATA_DIR.value or data_dir
    x_tr, y_tr = data.load_arrays(name, "train", data_dir, image_size=image_size)
    x_te, y_te = data.load_arrays(name, "test", data_dir, image_size=image_size)
  except common.USER_ERRORS as e:
    common.fail(e)
  ncls = info.num_classes
  clf = classifier.train(x_tr, y_tr, ncls)
  labels = np.asarray(labels)
  correct = classifier.predict(clf, images, ncls) == labels
  report = {
      "checkpoint_step": int(step), "task": config.task, "num_samples": len(labels),
      "seed": _SEED.value,
      "classifier_test_accuracy": classifier.accuracy(clf, x_te, y_te, ncls),
      "sample_accuracy": float(np.mean(correct)),
      "per_class": [round(float(np.mean(correct[labels == c])), 4) if np.any(labels == c)
                    else None for c in range(ncls)],
  }
  if "sampler" in generator.options:  # settings that describe the samples
    report.update(sampler=_SAMPLER.value or config.sample.sampler,
                  steps=_STEPS.value or config.sample.num_steps,
                  guidance=config.sample.guidance if _GUIDANCE.value is None
                  else _GUIDANCE.value)
  common.report(_WORKDIR.value, f"class_accuracy_{step}", report)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
