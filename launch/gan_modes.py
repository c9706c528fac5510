r"""Mode coverage of a generator of the ring of 8 Gaussians (a `ring8` run; docs/gan.md):

  python launch/gan_modes.py --workdir=/tmp/ring8 [--num_samples=2500] [--seed=0] [--raw_params]

Samples N points (EMA parameters by default) and prints one JSON line with
`evaluation.metrics.mode_coverage` (PacGAN's protocol: a sample is high quality within
3σ of its nearest mode, a mode is covered with ≥ 20 of 2,500 high-quality samples):
modes, high_quality, counts per mode, kl to uniform; also written to
<workdir>/eval/modes_<step>.json.
"""

from absl import app, flags

from diffusion_jax import data, runs
from diffusion_jax.evaluation import metrics
from diffusion_jax.training import generate
from diffusion_jax_launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A run trained on data.name='ring8'.")
_NUM = flags.DEFINE_integer("num_samples", 2500, "Samples N.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA.")
flags.mark_flags_as_required(["workdir"])
common.integer(_NUM, 1)
common.seed(_SEED)


def coverage(workdir: str, num_samples: int, seed: int = 0, use_ema: bool = True) -> dict:
  config, _, _ = runs.read(workdir)
  if config.data.name != "ring8":
    raise ValueError(f"{workdir} was trained on config.data.name={config.data.name!r}; mode "
                     "coverage is defined for 'ring8'")
  points, _, comp = generate.sample_run(workdir, num_samples, seed=seed, use_ema=use_ema)
  result = metrics.mode_coverage(points.reshape(num_samples, -1), data.builders.ring8_centers(),
                                 data.builders.RING8_STD)
  return dict(result, step=comp.step, num_samples=num_samples, ema=use_ema)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    results = coverage(_WORKDIR.value, _NUM.value, _SEED.value, not _RAW.value)
  except common.USER_ERRORS as e:
    common.fail(e)
  common.report(_WORKDIR.value, f"modes_{results['step']}", results)

def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
