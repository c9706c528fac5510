r"""Evaluate a trained run: sample-quality metrics in a feature network's space.

  diffusion-jax-evaluate --workdir=/tmp/run --feature_workdir=/tmp/domain_cls \
      [--metrics=fd,kid,pr,acc,is] [--num_samples=1000] [--batch_size=256] [--seed=0] \
      [--sampler=euler] [--steps=32] [--guidance=1] [--step=N]
  (unset flags: the run's config.eval, and config.sample for the sampler settings)
  diffusion-jax-evaluate --workdir=/tmp/run --inception_weights=fid_inception.npz \
      --metrics=fd,kid,pr,is                           # FID: fd_inception
  diffusion-jax-evaluate --workdir=/tmp/run --metrics=bpd_vlb,bpd_ode [--likelihood_images=1000]
  diffusion-jax-evaluate --workdir=/tmp/t2i --clip_workdir=/tmp/clip --metrics=clip_score

Feature networks: a run of the classifier task on clean images
(configs/digits_classifier.py --config.classifier.noise_conditional=False), numbers
labelled `*_domain`; the FID Inception-v3 from pytorch-fid's weight file, labelled
`*_inception`; a clip run's image encoder for clip_score (and `*_clip` distances). Each
comes with its data floor (train vs reference split; clip_score_real for clip_score).
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
                                "Classifier run giving the domain features (*_domain).")
_INCEPTION = flags.DEFINE_string(
    "inception_weights", None, "FID Inception-v3 weights: pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (needs torch) or its .npz conversion (*_inception).")
_REF_STATS = flags.DEFINE_string("ref_stats_dir", None, "Where Inception reference statistics "
                                 "are cached (default: <workdir>/eval/ref_stats).")
# Every flag left unset takes the run's config.eval value (sampler, steps, guidance:
# config.sample), so a bare command evaluates the run as its config says.
_CLIP = flags.DEFINE_string("clip_workdir", None, "A clip run for clip_score (default: "
                            "config.eval.clip_workdir, else the model's text.clip_workdir).")
_METRICS = flags.DEFINE_list("metrics", None, f"Some of {list(eval_run.METRICS)}.")
_NUM = flags.DEFINE_integer("num_samples", None, "Generated samples N.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global generation batch.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (the fixed protocol: sample i uses fold_in(seed, i)).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG weight (default: config.sample.guidance).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_REF = flags.DEFINE_string("reference_split", None, "Real split the samples are compared to.")
_FLOOR = flags.DEFINE_string("floor_split", None, "Real split giving the data floor.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's).")
_LIK_N = flags.DEFINE_integer("likelihood_images", None,
                              "bpd_vlb/bpd_ode: images of the reference split scored.")
_LIK_STEPS = flags.DEFINE_integer("likelihood_steps", None,
                                  "bpd_ode: RK4 steps; bpd_vlb: grid steps of continuous paths.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    results = eval_run.evaluate(
        _WORKDIR.value, _FEATURES.value, inception_weights=_INCEPTION.value,
        ref_stats_dir=_REF_STATS.value, clip_workdir=_CLIP.value, metrics=_METRICS.value,
        num_samples=_NUM.value,
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
