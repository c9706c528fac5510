r"""The quickstart: train configs/quickstart.py on CPU, then write a PNG grid of
class-conditional samples (one row per class) and check them with a classifier
trained on the real images.

  diffusion-jax-quickstart [--workdir=workdirs/quickstart] [--config.train.num_steps=...]
"""
import importlib.resources
import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import data, io
from diffusion_jax.evaluation import classifier
from diffusion_jax.training import generate, loop, tasks
from diffusion_jax_launch import common

# The shipped config, from the installed package (configs/ in a source checkout).
_DEFAULT_CONFIG = str(importlib.resources.files("diffusion_jax_configs") / "quickstart.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/quickstart", "Run directory.")
_PER_CLASS = flags.DEFINE_integer("per_class", 20, "Samples per class.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
common.integer(_PER_CLASS, 1)
common.seed(_SEED)


def _sample_classes(config) -> int:
  """The classes the config's model draws on request (its generator's num_classes),
  which must be the dataset's own (the domain classifier checks them); else an error."""
  info = loop.dataset_info(config)
  if not info.num_classes:
    raise ValueError(f"the quickstart needs a labelled dataset; {config.data.name!r} has none")
  generator = tasks.make(config, info).generator
  if generator is None:
    raise ValueError(f"the quickstart needs a model that generates images; "
                     f"config.task={config.task!r} generates nothing")
  if generator.num_classes != info.num_classes:
    raise ValueError("the quickstart needs a model conditioned on the dataset's classes "
                     "(config.model.class_conditional=True)")
  return info.num_classes


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  config, workdir = _CONFIG.value, _WORKDIR.value
  t0 = time.time()
  try:
    num_classes = _sample_classes(config)  # before training: fail fast
    io.path(workdir).mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    loop.train(config, workdir)
    t_train = time.time() - t_start
    labels = np.repeat(np.arange(num_classes), _PER_CLASS.value)
    images, labels, comp = generate.sample_run(workdir, len(labels), labels.tolist(),
                                               seed=_SEED.value)
  except common.USER_ERRORS as e:
    common.fail(e)
  if jax.process_index() != 0:
    return
  grid = io.save_grid(io.path(workdir) / "quickstart_samples.png", images, rows=num_classes)
  x_tr, y_tr = data.load_arrays(config.data.name, "train", config.data.data_dir)
  x_te, y_te = data.load_arrays(config.data.name, "test", config.data.data_dir)
  clf = classifier.train(x_tr, y_tr, num_classes)
  report = {
      "checkpoint_step": comp.step,
      "train_seconds": round(t_train, 1),
      "classifier_test_accuracy": classifier.accuracy(clf, x_te, y_te, num_classes),
      "sample_accuracy": classifier.accuracy(clf, images, labels, num_classes),
      "sampler": config.sample.sampler, "sampling_steps": config.sample.num_steps,
      "guidance": config.sample.guidance, "num_samples": len(labels),
      "total_seconds": round(time.time() - t0, 1),
  }
  io.write_atomic(io.path(workdir) / "quickstart_report.json", json.dumps(report, indent=2))
  print(json.dumps(report, indent=2))
  print(f"Samples (one row per class): {grid}")


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
