"""Training: the train state, optimizers from config, the one generic step, the generic
loop, sharded generation, and the tasks (one per model family).

    task = tasks.make(config, info)      # training.tasks: Task, Player, the capabilities
    state = task.init(key)               # a TrainState
    step = make_train_step(task)         # state, metrics = step(state, batch, key)
    state = train(config, workdir)       # the loop: resume, checkpoints, grids, evaluation
    images, labels, run = generate.sample_run(workdir, 64)

Modules: `state` (TrainState, EMA), `optim` (optax from config.optim, trainable
subsets), `step` (the generic step), `loop` (the generic loop), `generate` (sharded
sampling of N examples), `warmstart` (starting from another run's parameters,
config.init), `tasks` (the task protocol and the tasks).
"""
from diffusion_jax.training import generate, loop, optim, state, step, tasks, warmstart
from diffusion_jax.training.loop import train
from diffusion_jax.training.state import TrainState, ema_update, init_state
from diffusion_jax.training.step import make_train_step

__all__ = ["TrainState", "ema_update", "generate", "init_state", "loop", "make_train_step",
           "optim", "state", "step", "tasks", "train", "warmstart"]
