r"""Train any config.

  diffusion-jax-train --config=configs/quickstart.py --workdir=/tmp/run \
      [--config.optim.lr=3e-4 ...]

Re-running the same command on the same workdir resumes from its last checkpoint;
a larger --config.train.num_steps continues a finished run.
"""
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import evaluation, io
from diffusion_jax.training import loop
from diffusion_jax_launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created if missing): a local "
                                "path or a cloud URI (gs://bucket/run).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    io.path(_WORKDIR.value).mkdir(parents=True, exist_ok=True)
    loop.train(_CONFIG.value, _WORKDIR.value, make_evaluator=evaluation.make_evaluator)
  except common.USER_ERRORS as e:
    common.fail(e)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
