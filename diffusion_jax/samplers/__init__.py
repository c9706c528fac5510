"""Samplers (compiled loops over a shared denoiser), guidance and editing wrappers."""
from diffusion_jax.samplers import editing, guidance, spacing
from diffusion_jax.samplers.denoiser import make_denoiser
from diffusion_jax.samplers.solvers import (
  annealed_langevin,
  ddim,
  ddpm,
  dpm_solver_2m,
  edm,
  euler,
  heun,
  pc,
  sde,
  time_grid,
)

__all__ = ["SAMPLERS", "annealed_langevin", "ddim", "ddpm", "dpm_solver_2m", "edm", "editing", "euler",
           "get", "guidance", "heun", "make_denoiser", "pc", "sde", "spacing", "time_grid"]

SAMPLERS = {"euler": euler, "ddpm": ddpm, "ddim": ddim, "heun": heun,
            "dpm_solver_2m": dpm_solver_2m, "sde": sde, "pc": pc, "edm": edm,
            "annealed_langevin": annealed_langevin}


def get(name: str):
  """Sampler function by name; an unknown name is an error listing the known ones."""
  if name not in SAMPLERS:
    raise ValueError(f"sampler {name!r} is unknown: expected one of {sorted(SAMPLERS)}")
  return SAMPLERS[name]
