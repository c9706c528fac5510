"""Samplers (compiled loops over a shared denoiser), guidance and editing wrappers."""
from diffusion_jax.samplers import editing, guidance, spacing
from diffusion_jax.samplers.denoiser import make_denoiser
from diffusion_jax.samplers.solvers import (
  annealed_langevin,
  consistency,
  ddim,
  ddpm,
  dpm_solver_2m,
  dpm_solver_3m,
  edm,
  euler,
  heun,
  ipndm,
  pc,
  sde,
  time_grid,
  unipc,
)

__all__ = ["SAMPLERS", "annealed_langevin", "consistency", "ddim", "ddpm", "dpm_solver_2m",
           "dpm_solver_3m", "edm", "editing", "euler", "get", "guidance", "heun", "ipndm",
           "make_denoiser", "pc", "sde", "spacing", "time_grid", "unipc"]

SAMPLERS = {"euler": euler, "ddpm": ddpm, "ddim": ddim, "heun": heun,
            "dpm_solver_2m": dpm_solver_2m, "dpm_solver_3m": dpm_solver_3m, "unipc": unipc,
            "ipndm": ipndm, "consistency": consistency, "sde": sde, "pc": pc, "edm": edm,
            "annealed_langevin": annealed_langevin}


def get(name: str):
  """Sampler function by name; an unknown name is an error listing the known ones."""
  if name not in SAMPLERS:
    raise ValueError(f"sampler {name!r} is unknown: expected one of {sorted(SAMPLERS)}")
  return SAMPLERS[name]
