r"""Samplers on a 2-D Gaussian mixture with an exact denoiser: distance to truth vs NFE.

  python launch/benchmark_samplers.py [--n=4000] [--spacing=uniform]

The mixture and its exact model_fn are `tests/samplers/mixture.py`; the distance is
the sliced 2-Wasserstein distance to 100k exact samples (its floor, printed first, is
what n exact samples score). Prints one markdown table per (path, prediction) and the
compile time of one sampler against its number of steps.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "samplers"))
import mixture

from diffusion_jax import samplers
from diffusion_jax.diffusion import paths

_N = flags.DEFINE_integer("n", 4000, "Samples per cell.")
_SPACING = flags.DEFINE_string("spacing", "uniform", "uniform | karras | logsnr")
flags.register_validator(_N, lambda n: n >= 1, "must be >= 1")
flags.register_validator(_SPACING, lambda s: s in samplers.spacing.SPACINGS,
                         f"must be one of {', '.join(samplers.spacing.SPACINGS)}")

SAMPLERS = ("euler", "heun", "ddim", "ddpm", "dpm_solver_2m", "sde", "pc", "edm")
NFES = (5, 10, 20, 50, 100)
CASES = ((paths.Path("flow"), "velocity"), (paths.Path("vp_discrete", 1000, "linear"), "eps"))


def steps_for(name, nfe):
  """Steps whose NFE is closest to `nfe` from below (heun, edm: 2N − 1; pc: 2N)."""
  return {"heun": (nfe + 1) // 2, "edm": (nfe + 1) // 2, "pc": nfe // 2}.get(name, nfe)


def main(argv):
  del argv
  n = _N.value
  keys = jax.random.split(jax.random.key(1), n)
  x1 = jax.random.normal(jax.random.key(2), (n, 2))
  floor = mixture.sliced_wasserstein(mixture.sample(jax.random.key(7), n))
  print(f"n = {n}, spacing = {_SPACING.value}; floor (exact samples): {floor:.3f}\n")
  for path, prediction in CASES:
    den = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                                 jnp.zeros(n, jnp.int32))
    print(f"**{path.kind}{'-' + path.beta_schedule if path.discrete else ''}, "
          f"{prediction}** (sliced W₂; NFE in brackets where it differs)\n")
    print("| sampler | " + " | ".join(f"NFE {k}" for k in NFES) + " |")
    print("|---|" + "---:|" * len(NFES))
    for name in SAMPLERS:
      cells = []
      for target in NFES:
        steps = steps_for(name, target)
        fn = jax.jit(lambda x, k, name=name, den=den, path=path, steps=steps: samplers.get(name)(
            den, path, x, k, steps, spacing=_SPACING.value))
        x0, nfe = fn(x1, keys)
        d = mixture.sliced_wasserstein(x0)
        cells.append(f"{d:.3f}" + (f" ({nfe})" if nfe != target else ""))
      print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print()

  path, prediction = CASES[0]
  den = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                               jnp.zeros(n, jnp.int32))
  print("compile time (s) of jit(sampler).lower().compile(), flow path:\n")
  print("| sampler | 10 steps | 100 steps | 1000 steps |\n|---|---:|---:|---:|")
  for name in ("heun", "dpm_solver_2m", "pc"):
    times = []
    for steps in (10, 100, 1000):
      fn = jax.jit(lambda x, k, name=name, steps=steps: samplers.get(name)(den, path, x, k,
                                                                        steps)[0])
      start = time.perf_counter()
      fn.lower(x1, keys).compile()
      times.append(time.perf_counter() - start)
    print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
