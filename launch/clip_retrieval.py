r"""Held-out retrieval of a CLIP run (config.task='clip'; docs/clip.md):

  python launch/clip_retrieval.py --workdir=/tmp/digits_clip [--split=test] [--step=N]

Prints one JSON line: top-1 image→text / text→image retrieval, instance-level (i2t, t2i:
the example's own caption) and class-level (i2t_class, t2i_class: a caption of the same
label, the headline for label-made captions), zero-shot classification accuracy
(embedded digits), chance level; and writes it to <workdir>/eval/retrieval_<step>.json.
"""

from absl import app, flags

from diffusion_jax.training.tasks import clip as clip_task
from diffusion_jax_launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "The clip run's directory.")
_SPLIT = flags.DEFINE_string("split", "test", "Held-out split of the run's dataset.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_EMA = flags.DEFINE_bool("ema", True, "Use the EMA parameters.")
_SEED = flags.DEFINE_integer("seed", 0, "Caption template seed (embedded digits).")
flags.mark_flags_as_required(["workdir"])
common.integer(_STEP, 0)
common.seed(_SEED)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    results = clip_task.evaluate_run(_WORKDIR.value, split=_SPLIT.value,
                                     data_dir=_DATA_DIR.value, step=_STEP.value,
                                     use_ema=_EMA.value, seed=_SEED.value)
  except common.USER_ERRORS as e:
    common.fail(e)
  common.report(_WORKDIR.value, f"retrieval_{results['step']}", results)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
