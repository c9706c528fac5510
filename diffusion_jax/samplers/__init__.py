"""Samplers (compiled loops over a shared denoiser) and guidance wrappers."""
from diffusion_jax.samplers import guidance
from diffusion_jax.samplers.denoiser import make_denoiser
from diffusion_jax.samplers.solvers import ddim, ddpm, euler, time_grid

__all__ = ["SAMPLERS", "ddim", "ddpm", "euler", "get", "guidance", "make_denoiser", "time_grid"]

SAMPLERS = {"euler": euler, "ddpm": ddpm, "ddim": ddim}


def get(name: str):
  """Sampler function by name; an unknown name is an error listing the known ones."""
  if name not in SAMPLERS:
    raise ValueError(f"sampler {name!r} is unknown: expected one of {sorted(SAMPLERS)}")
  return SAMPLERS[name]
