r"""Evaluate a trained run: sample-quality metrics in a feature network's space.

  diffusion-jax-evaluate --workdir=/tmp/run --feature_workdir=/tmp/domain_cls \
      [--metrics=fd,kid,pr,acc,is] [--num_samples=1000] [--batch_size=256] [--seed=0] \
      [--sampler=euler] [--steps=32] [--guidance=1] [--step=N]
  diffusion-jax-evaluate --workdir=/tmp/run --metrics=bpd_vlb,bpd_ode [--likelihood_images=1000]

The feature network is a run of the classifier task on clean images
(configs/digits_classifier.py --config.classifier.noise_conditional=False): numbers
are labelled `*_domain` and come with their data floor (train vs reference split).
Writes <workdir>/eval/<step>.json, eval/metrics.jsonl and TensorBoard scalars; an
interrupted evaluation resumes where it stopped. See docs/evaluation.md.
"""
import json

import jax
from absl import app, flags

from diffusion_jax.evaluation import run as eval_run
from diffusion_jax_launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
_FEATURES = flags.DEFINE_string("feature_workdir", None,
                                "Classifier run giving the features (sample metrics).")
_METRICS = flags.DEFINE_list("metrics", ["fd", "kid", "pr", "acc"],
                             f"Some of {list(eval_run.METRICS)}.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Generated samples N.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global generation batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (the fixed protocol: sample i uses fold_in(seed, i)).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG weight (default: config.sample.guidance).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_REF = flags.DEFINE_string("reference_split", "test", "Real split the samples are compared to.")
_FLOOR = flags.DEFINE_string("floor_split", "train", "Real split giving the data floor.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's).")
_LIK_N = flags.DEFINE_integer("likelihood_images", 1000,
                              "bpd_vlb/bpd_ode: images of the reference split scored.")
_LIK_STEPS = flags.DEFINE_integer("likelihood_steps", 100,
                                  "bpd_ode: RK4 steps; bpd_vlb: grid steps of continuous paths.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    results = eval_run.evaluate(
        _WORKDIR.value, _FEATURES.value, metrics=_METRICS.value, num_samples=_NUM.value,
        batch_size=_BATCH.value, seed=_SEED.value, sampler=_SAMPLER.value,
        num_steps=_STEPS.value, guidance=_GUIDANCE.value, step=_STEP.value,
        reference_split=_REF.value, floor_split=_FLOOR.value, data_dir=_DATA_DIR.value,
        likelihood_images=_LIK_N.value, likelihood_steps=_LIK_STEPS.value)
  except common.USER_ERRORS as e:
    common.fail(e)
  if jax.process_index() == 0:
    print(json.dumps(results, indent=2))


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
