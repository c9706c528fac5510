"""Tasks: one module per model family (see diffusion.py for the interface)."""
from diffusion_jax.training.tasks import classifier, clip, diffusion, gan

TASKS = {"diffusion": diffusion, "classifier": classifier, "clip": clip, "gan": gan}


def get(name: str):
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}: expected one of {sorted(TASKS)}")
  return TASKS[name]
