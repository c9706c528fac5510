r"""ODE solvers on a 2-D Gaussian mixture with an exact denoiser: distance to the
converged ODE solution vs NFE.

  python launch/benchmark_solvers.py [--n=4000]

The mixture and its exact model_fn are `tests/samplers/mixture.py`. Every solver starts
from the same x₁; the distance is the per-sample one, RMS over samples of
‖x₀ − x₀_ref‖, where x₀_ref is the converged PF-ODE solution from the same x₁:
DPM-Solver++(3M) with 4000 log-SNR steps. A discrete path allows at most its T = 1000
grid steps, whose last ones stay coarse in λ, so its reference is solved on a
continuous stand-in: in y = x/a and σ = b/a the PF-ODE dy/dσ = ε̂ is the same for every
path (the mixture's posterior mean depends on (x/a, σ) only), so the VE path with
σ_max = σ(1) of the discrete path, started from y₁ = x₁/a(1), has the same solution.
Printed first: the reference's distance to 3M with 2000 steps, to UniPC with 2000
(another method), to Heun with 2000 (flow only: Heun's last Euler step in t crosses
the VE path's jump from b = σ_min to b(0) = 0 and stays off by ~0.03 however fine the
grid), and what 1000 steps on the discrete path's own grid reach. One markdown table
per (path, prediction, spacing); heun runs at the NFE 2N − 1 closest to the column's
from below.
"""
import os
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "samplers"))
import mixture

from diffusion_jax import samplers
from diffusion_jax.diffusion import paths

_N = flags.DEFINE_integer("n", 4000, "Samples (initial noises) per cell.")
flags.register_validator(_N, lambda n: n >= 1, "must be >= 1")

SOLVERS = ("euler", "ddim", "heun", "dpm_solver_2m", "dpm_solver_3m", "unipc", "ipndm")
NFES = (5, 10, 20)
SPACINGS = ("uniform", "logsnr")
CASES = ((paths.Path("flow"), "velocity"), (paths.Path("vp_discrete", 1000, "linear"), "eps"))
REF_STEPS = 4000


def reference_problem(path, prediction, x1):
  """(path, prediction, x_init) of a continuous problem with the same PF-ODE solution."""
  if not path.discrete:
    return path, prediction, x1
  a1, b1 = (float(v) for v in path.ab(1.0))
  return paths.Path("ve", sigma_min=1e-4, sigma_max=b1 / a1), "eps", x1 / a1


def steps_for(name, nfe):
  """Steps whose NFE is closest to `nfe` from below (heun: 2N − 1)."""
  return (nfe + 1) // 2 if name == "heun" else nfe


def rms_distance(x, y):
  return float(jnp.sqrt(jnp.mean(jnp.sum((x - y) ** 2, axis=-1))))


def main(argv):
  del argv
  n = _N.value
  keys = jax.random.split(jax.random.key(1), n)  # unused: every solver here is deterministic
  x1 = jax.random.normal(jax.random.key(2), (n, 2))
  print(f"n = {n}; distance = RMS over samples of ‖x₀ − x₀_ref‖ (same x₁)\n")
  for path, prediction in CASES:
    def solver(path, prediction, x_init):
      den = samplers.make_denoiser(mixture.model_fn(path, prediction), path, prediction,
                                   jnp.zeros(n, jnp.int32))
      return lambda name, steps, spacing: jax.jit(lambda x: samplers.get(name)(
          den, path, x, keys, steps, spacing=spacing))(x_init)

    solve = solver(path, prediction, x1)
    solve_ref = solver(*reference_problem(path, prediction, x1))
    label = f"{path.kind}{'-' + path.beta_schedule if path.discrete else ''}, {prediction}"
    ref, _ = solve_ref("dpm_solver_3m", REF_STEPS, "logsnr")
    checks = [("dpm_solver_3m", REF_STEPS // 2), ("unipc", REF_STEPS // 2)]
    if not path.discrete:
      checks.append(("heun", REF_STEPS // 2))
    dists = ", ".join(
        f"{name} {steps}: {rms_distance(solve_ref(name, steps, 'logsnr')[0], ref):.1e}"
        for name, steps in checks)
    stand_in = " on the VE stand-in" if path.discrete else ""
    print(f"**{label}**: reference dpm_solver_3m, {REF_STEPS} log-SNR steps{stand_in}; its "
          f"distance to {dists}")
    if path.discrete:
      own = {name: rms_distance(solve(name, path.num_steps, "uniform")[0], ref)
             for name in ("heun", "dpm_solver_3m", "unipc")}
      print(f"on the path's own grid (all {path.num_steps} steps): " +
            ", ".join(f"{k} {v:.1e}" for k, v in own.items()))
    print()
    for spacing in SPACINGS:
      print(f"*{label}, spacing = {spacing}* (NFE in brackets where it differs)\n")
      print("| solver | " + " | ".join(f"NFE {k}" for k in NFES) + " |")
      print("|---|" + "---:|" * len(NFES))
      for name in SOLVERS:
        cells = []
        for target in NFES:
          x0, nfe = solve(name, steps_for(name, target), spacing)
          cells.append(f"{rms_distance(x0, ref):.4f}" + (f" ({nfe})" if nfe != target else ""))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
      print()


if __name__ == "__main__":
  app.run(main)
