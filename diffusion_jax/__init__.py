"""diffusion_jax: a pure-JAX library for generative image models (diffusion, flows, GANs).

The public API is these subpackages and modules, each with an `__all__` (docs/api.md):

    diffusion    the math: paths x_t = a(t)·x + b(t)·z, predictions, losses, likelihood
    samplers     the denoiser (x_t, t) -> (x̂₀, ε̂), samplers, guidance/editing, time grids
    nets         U-Net, DiT, GANs, the classifier, CLIP, Inception-v3, VGG16/LPIPS (flax)
    losses       contrastive (CLIP / SigLIP) and adversarial losses
    training     TrainState, optimizers, the generic step and loop, generation, tasks
    evaluation   metrics (Fréchet distance, KID, IS, precision/recall, PSNR, SSIM), evaluator
    data         datasets (TFDS builders), the grain input pipeline, DatasetInfo
    runs         a finished run as a frozen component: runs.load(workdir)
    config, parallel, checkpoint, io, writers    the base config, meshes, orbax, PNGs, logs

`import diffusion_jax` itself is cheap: each of them is imported on first use
(`diffusion_jax.samplers`, `from diffusion_jax import runs`), so importing a lower layer
never loads a higher one. Nothing here imports the command lines (`diffusion_jax_launch`)
or torch.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["checkpoint", "config", "data", "diffusion", "evaluation", "io", "losses", "nets",
           "parallel", "runs", "samplers", "training", "writers"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, `__getattr__` below
  from diffusion_jax import (checkpoint, config, data, diffusion, evaluation, io, losses, nets,
                             parallel, runs, samplers, training, writers)


def __getattr__(name: str) -> ModuleType:
  """The subpackage or module `name` of __all__, imported on first access (PEP 562)."""
  if name in __all__:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
