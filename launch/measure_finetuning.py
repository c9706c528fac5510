r"""Did fine-tuning teach the new concept, and what did the model forget?
(docs/finetuning.md)

  python launch/measure_finetuning.py --workdir=/tmp/ft_ti \
      --concept_prompt="a handwritten <v>" --concept_prompt="the digit <v>" \
      [--adapter=FILE[:WEIGHT]] [--concept_label=9] [--per_prompt=3]

Samples `num_concept` images for the concept prompts (cycled) and `per_prompt` images
for every caption template × digit of the other classes (data/text.py; the digits the
base model knew), at the run's config.sample settings, and classifies them with the
quickstart's domain MLP (evaluation/classifier.py) trained on the whole real training
split of --dataset, all ten digits. Prints one JSON line: the MLP's held-out accuracy,
the share of concept samples it calls `concept_label`, and the accuracy on the known
digits' prompts. A class-conditional run (no text encoder) is asked for label
`concept_label` (concept) and labels 0..9 without it.
"""
import json
import time

import jax
import numpy as np
from absl import app, flags

from diffusion_jax import data
from diffusion_jax.data import text as text_lib
from diffusion_jax.evaluation import classifier as mlp
from diffusion_jax.training import generate
from diffusion_jax_launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A diffusion or fine-tuning run on digits.")
_ADAPTERS = flags.DEFINE_multi_string("adapter", None, "FILE[:WEIGHT] loaded onto the run.")
_CONCEPT = flags.DEFINE_multi_string("concept_prompt", None, "Prompts of the new concept.")
_LABEL = flags.DEFINE_integer("concept_label", 9, "The digit the concept should be.")
_NUM_CONCEPT = flags.DEFINE_integer("num_concept", 200, "Samples of the concept prompts.")
_PER_PROMPT = flags.DEFINE_integer("per_prompt", 3, "Samples per (template, digit) caption.")
_DATASET = flags.DEFINE_string("dataset", "sklearn_digits", "Real digits of the classifier.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir of --dataset.")
_SEED = flags.DEFINE_integer("seed", 1, "Sampling seed.")
_LORA_SCALE = flags.DEFINE_float("lora_scale", None, "LoRA scale s (default: the run's).")
flags.mark_flags_as_required(["workdir"])
common.adapter_specs(_ADAPTERS)
common.integer(_LABEL, 0, 9)
common.integer(_NUM_CONCEPT, 1)
common.integer(_PER_PROMPT, 1)
common.seed(_SEED)
common.number(_LORA_SCALE)


def measure(workdir, concept_prompts, *, concept_label=9, num_concept=200, per_prompt=3,
            dataset="sklearn_digits", data_dir=None, seed=1, adapters=(), lora_scale=None):
  t0 = time.time()
  params = mlp.train(*data.load_arrays(dataset, "train", data_dir), 10)
  results = {"classifier_test_accuracy":
             mlp.accuracy(params, *data.load_arrays(dataset, "test", data_dir), 10)}
  known = [d for d in range(10) if d != concept_label]
  n_t = len(text_lib.TEMPLATES)
  known_labels = np.repeat(np.asarray(known), n_t * per_prompt)
  known_prompts = [text_lib.digit_caption(y, i % n_t) for i, y in enumerate(known_labels)]
  kw = dict(seed=seed, adapters=adapters, lora_scale=lora_scale)
  images, _, comp = generate.sample_run(workdir, 1, [0], **kw)  # the run's kind, compiled once
  text = bool(comp.config.text.encoder)
  if text:
    if not concept_prompts:
      raise ValueError("--concept_prompt: give the prompts of the new concept")
    concept, _, _ = generate.sample_run(workdir, num_concept, [0] * num_concept,
                                        prompts=list(concept_prompts), **kw)
    seen, _, _ = generate.sample_run(workdir, len(known_labels), known_labels.tolist(),
                                     prompts=known_prompts, **kw)
  else:
    concept, _, _ = generate.sample_run(workdir, num_concept, [concept_label] * num_concept,
                                        **kw)
    seen, _, _ = generate.sample_run(workdir, len(known_labels), known_labels.tolist(), **kw)
  predicted = mlp.predict(params, np.asarray(concept), 10)
  results.update(
      step=comp.step, concept_share=float(np.mean(predicted == concept_label)),
      concept_predictions=np.bincount(predicted, minlength=10).tolist(),
      known_accuracy=mlp.accuracy(params, np.asarray(seen), known_labels, 10),
      num_concept=num_concept, num_known=int(len(known_labels)),
      seconds=round(time.time() - t0, 1))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    results = measure(_WORKDIR.value, _CONCEPT.value, concept_label=_LABEL.value,
                      num_concept=_NUM_CONCEPT.value, per_prompt=_PER_PROMPT.value,
                      dataset=_DATASET.value, data_dir=_DATA_DIR.value, seed=_SEED.value,
                      adapters=common.adapter_files(_ADAPTERS.value), lora_scale=_LORA_SCALE.value)
  except common.USER_ERRORS as e:
    common.fail(e)
  print(json.dumps(results))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
