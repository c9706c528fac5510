r"""Evaluate a trained run: sample-quality metrics in feature networks' spaces, bits/dim.

  diffusion-jax-evaluate --workdir=/tmp/run --config.eval.feature_workdir=/tmp/domain_cls \
      [--config.eval.metrics=fd,kid,pr,acc,is] [--config.eval.num_samples=1000] \
      [--config.eval.batch_size=256] [--config.eval.seed=0] \
      [--config.sample.sampler=heun] [--config.sample.num_steps=32] \
      [--config.sample.guidance=1] [--step=N] [--raw_params]
  diffusion-jax-evaluate --workdir=/tmp/run --config.eval.inception_weights=fid_inception.npz \
      --config.eval.metrics=fd,kid,pr,is                        # FID: fd_inception
  diffusion-jax-evaluate --workdir=/tmp/run --config.eval.metrics=bpd_vlb,bpd_ode \
      [--config.eval.likelihood_images=1000 --config.eval.likelihood_steps=100]
  diffusion-jax-evaluate --workdir=/tmp/t2i --config.eval.metrics=clip_score \
      [--config.eval.clip_workdir=/tmp/clip]
  diffusion-jax-evaluate --workdir=/tmp/vae --config.eval.metrics=bpd_elbo,bpd_iwae,psnr,ssim \
      [--config.eval.iwae_samples=64]                           # a model's bound / autoencoder
  diffusion-jax-evaluate --workdir=/tmp/ae --config.eval.metrics=psnr,ssim,lpips,rfd \
      --config.eval.lpips_weights=lpips_vgg16.npz --config.eval.feature_workdir=/tmp/domain_cls

The settings are the run's own config.eval and config.sample; `--config.eval.*` and
`--config.sample.*` override them (parsed and type-checked as in diffusion-jax-train;
other keys are what the run was trained with, and an error). Feature networks: a run
with features (config.eval.feature_workdir, e.g. the classifier task on clean images:
`*_domain` numbers), the FID Inception-v3 from pytorch-fid's weight file
(`*_inception`), a clip run for clip_score (`*_clip`). Writes <workdir>/eval/<step>.json,
eval/metrics.jsonl and TensorBoard scalars; an interrupted evaluation resumes where it
stopped. See docs/evaluation.md.
"""
import json
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import config as config_lib, evaluation
from diffusion_jax_launch import common

try:  # (the flag reads the --config.* overrides of sys.argv when it is defined)
  _CONFIG = config_flags.DEFINE_config_dict(
      "config", config_lib.base(), "Overrides of the run's config.eval and config.sample "
      "(--config.eval.metrics=fd,kid --config.sample.sampler=heun ...); no config file.")
except (AttributeError, KeyError) as e:  # an unknown key: one line, as parse_flags says it
  _named = [a.split("=")[0] for a in sys.argv[1:] if a.lstrip("-").startswith("config.")]
  _missing = [a for a in _named if str(e).strip("'\"") in a.split(".")] or _named
  common.fail(f"unknown config key {' '.join(_missing)}")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_RAW = flags.DEFINE_bool("raw_params", False, "Evaluate the trained parameters, not their EMA.")
flags.mark_flags_as_required(["workdir"])
common.integer(_STEP, 0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  try:
    results = evaluation.evaluate(_WORKDIR.value, overrides=overrides, step=_STEP.value,
                                  use_ema=not _RAW.value)
  except common.USER_ERRORS as e:
    common.fail(e)
  if jax.process_index() == 0:
    print(json.dumps(results, indent=2))


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
