r"""Does a text-to-image digits run draw what its captions say? (docs/text_to_image.md)

  python launch/measure_text_to_image.py --workdir=/tmp/digits_t2i [--per_prompt=3]

Samples `per_prompt` images for every caption template × digit (data/text.py), at CFG
w = 0 and at the run's config.sample.guidance, and classifies them with the quickstart's
domain MLP trained on the real training split (evaluation/classifier.py). Prints one
JSON line: the MLP's held-out accuracy and the samples' accuracy at each w.
"""
import json

import jax
import numpy as np
from absl import app, flags

from diffusion_jax import data, runs
from diffusion_jax.data import text as text_lib
from diffusion_jax.evaluation import classifier as mlp
from diffusion_jax.training import generate
from diffusion_jax_launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A text-to-image run on an embedded digit set.")
_PER_PROMPT = flags.DEFINE_integer("per_prompt", 3, "Samples per (template, digit) caption.")
_SEED = flags.DEFINE_integer("seed", 1, "Sampling seed.")
flags.mark_flags_as_required(["workdir"])
common.integer(_PER_PROMPT, 1)
common.seed(_SEED)


def measure(workdir: str, per_prompt: int = 3, seed: int = 1) -> dict:
  comp = runs.load(workdir)
  config = comp.config
  if not config.text.encoder or not comp.info.label_captions:
    raise ValueError(f"{workdir}: expected a text-conditional run on a dataset captioned "
                     "by its labels (the embedded digits)")
  gen = generate.generator_of(comp)
  d = config.data.data_dir
  params = mlp.train(*data.load_arrays(config.data.name, "train", d), 10)
  results = {"step": comp.step, "classifier_test_accuracy":
             mlp.accuracy(params, *data.load_arrays(config.data.name, "test", d), 10)}
  n_t = len(text_lib.TEMPLATES)
  labels = np.repeat(np.arange(10), n_t * per_prompt)
  prompts = [text_lib.digit_caption(y, i % n_t) for i, y in enumerate(labels)]
  cond = gen.conditioning(np.zeros(len(labels), np.int32), prompts=prompts)
  for w in sorted({0.0, float(config.sample.guidance)}):
    fn = generate.compile_sampler(gen.sample(guidance=w))
    images = generate.generate(fn, comp.params, cond, jax.random.key(seed), comp.mesh)
    results[f"accuracy_w{w:g}"] = mlp.accuracy(params, images, labels, 10)
  results["num_samples"] = len(labels)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    results = measure(_WORKDIR.value, _PER_PROMPT.value, _SEED.value)
  except common.USER_ERRORS as e:
    common.fail(e)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
