"""Tasks: one module per model family, each with `make(config, info) -> Task` (the
protocol and its capabilities: `base.py`).

    task = tasks.make(config, info)
    state = task.init(key)
    step = training.step.make_train_step(task)
    if task.generator is not None: ...
"""
import importlib

from diffusion_jax.training.tasks.base import (
    Adapters, Autoencoder, Bound, Denoiser, Features, Generator, Guide, Likelihood, Player, StepContext, Task,
    TextEncoder)

# config.task → the module in this package that makes it. Modules are imported when a
# task is made, so a task may use another run's task (a frozen component) without an
# import cycle.
TASKS = ("diffusion", "classifier", "clip", "gan", "vae", "autoencoder", "progressive",
         "guidance_distillation", "consistency", "adversarial_distillation", "finetune")

__all__ = ["TASKS", "Adapters", "Autoencoder", "Bound", "Denoiser", "latent", "Features", "Generator", "Guide", "Likelihood", "Player", "StepContext",
           "Task", "TextEncoder", "make", "module"]


def __getattr__(name: str):
  if name == "latent":  # frozen autoencoders (it imports this package: loaded on first use)
    return importlib.import_module(f"{__name__}.latent")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def module(name: str):
  """The module of task `name` (config.task)."""
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}: expected one of {list(TASKS)}")
  return importlib.import_module(f"diffusion_jax.training.tasks.{name}")


def make(config, info) -> Task:
  """The Task of `config` (config.task) for data described by `info` (DatasetInfo)."""
  return module(config.task).make(config, info)
