"""The generic training loop. It knows nothing about any task: it asks the task's
protocol (`tasks/base.py`) for its state, its players (through the one generic step)
and, for sample grids, its `generator` capability.

    config ─► data ─► global batch ─► compiled step ─► state ─► checkpoint
                                            └─ metrics        ├─► sampler ─► PNG grid
                                                              └─► evaluator ─► eval/<step>.json

The periodic evaluator is a callback from the entry point (`make_evaluator`, e.g.
`evaluation.make_evaluator`): evaluation is a layer above training, which never
imports it. The step compiles with `jax.jit` over the mesh (config.train.parallel =
'jit', the default) or with `jax.pmap` over the devices ('pmap'), the same body.

Re-running on the same workdir resumes from the last checkpoint (state and data
iterator), so N steps in one go equal N/2 + N/2 across a restart, bit for bit on CPU.
SIGTERM (preemption) saves a checkpoint at the current step and returns cleanly.
"""
from __future__ import annotations

import os
import signal
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import checkpoint, config as config_lib, data, io, parallel, runs, writers
from diffusion_jax.training import generate, step as step_lib, tasks, warmstart


class _Preemption:
  """Records SIGTERM; multi-host runs also ask JAX's preemption sync point, which
  agrees on one step across hosts (it needs jax.distributed.initialize)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def dataset_info(config):
  """DatasetInfo of config.data (image shape after the configured resize; the examples
  kept by data.labels / data.max_examples)."""
  _, info = data.get_source(config.data.name, config.data.split, config.data.data_dir,
                            image_size=config.data.image_size or None,
                            labels=tuple(config.data.labels),
                            max_examples=config.data.max_examples)
  return info


def keys(seed: int):
  """(init_key, step_root, sample_key) from the one root key of config.seed."""
  return tuple(jax.random.split(jax.random.key(seed), 3))


def train(config, workdir: str, devices=None, make_evaluator=None):
  """Trains config in workdir (resuming if it holds a checkpoint). Returns the state.

  devices: the devices of the mesh (default: every device of every host).
  make_evaluator(config, info, workdir, mesh) -> evaluate(step, params, *, extra) ->
    results: the periodic evaluator (config.eval.every > 0), built before the first
    step so a bad config.eval fails at once; `evaluation.make_evaluator` is one.
  SIGTERM at any point (even while compiling) saves after the next step and returns.
  """
  with _Preemption() as preemption:
    return _train(config, workdir, devices, preemption, make_evaluator)


def _train(config, workdir, devices, preemption, make_evaluator):
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  parallel.check_batch_size(config.data.batch_size, mesh)
  info = dataset_info(config)
  task = tasks.make(config, info)
  init_key, step_root, sample_key = keys(config.seed)

  abstract = jax.eval_shape(task.init, init_key)
  shardings = parallel.state_shardings(mesh, abstract, config.mesh)
  mngr = checkpoint.manager(workdir, max_to_keep=config.train.keep_checkpoints,
                            async_save=config.train.async_checkpointing)
  meta = runs.metadata(config, info)
  data_iter = data.make_train_iterator(config.data, seed=config.seed, text=task.text)

  latest = mngr.latest_step()
  if latest is not None:
    _check_compatible(mngr, latest, config, workdir)
    try:
      state, data_state, _ = checkpoint.restore(mngr, latest, abstract, shardings)
    except ValueError as e:
      raise ValueError(f"workdir {workdir} holds a checkpoint (step {latest}) whose state "
                       f"does not match this config; use a new --workdir. Nothing was "
                       f"changed. Orbax says: {e}") from e
    data_iter.set_state(data_state)
    logging.info("Resumed from %s at step %d.", mngr.directory, latest)
  else:
    state = _compile_init(task.init, shardings, init_key)(init_key)
    state = warmstart.apply(config, state, mesh, shardings)
    if config.init.from_workdir:
      logging.info("Initialised from %s (%s parameters).", config.init.from_workdir,
                   config.init.params)
  for name, trained, total in warmstart.trainable_summary(task.players, abstract.params):
    logging.info("Trainable parameters of %s: %d of %d (%.2f%%).", name, trained, total,
                 100.0 * trained / max(total, 1))

  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))

  run_step, current = _compile_step(config, task, mesh, shardings, state)
  sampler = grid = None
  if task.generator is not None and config.sample.per_class and task.generator.pictures:
    sampler = generate.compile_sampler(task.generator.sample(), task.generator.frozen)
    grid = task.generator.grid()
  evaluator = None
  if config.eval.every:
    if make_evaluator is None:
      raise ValueError(f"config.eval.every={config.eval.every}, but no evaluator was given "
                       "(diffusion-jax-train passes evaluation.make_evaluator)")
    evaluator = make_evaluator(config, info, workdir, mesh)
  writer = writers.MetricWriter(workdir)
  num_steps, tc = config.train.num_steps, config.train
  step = int(jax.device_get(state.step))

  def save(step):
    checkpoint.save(mngr, step, current(), data_iter.get_state(), meta)
    if task.adapters is not None:  # the small trained parts alone (a fine-tuning run)
      tensors, extra = task.adapters.export(jax.device_get(current().ema_params))
      if jax.process_index() == 0:
        io.save_tensors(os.path.join(workdir, "adapters", f"{step}.safetensors"), tensors,
                        dict(extra, step=str(step)))

  def sample_grid(step):
    if sampler is None:
      return
    cond, rows = grid
    images = generate.generate(sampler, current().ema_params, cond, sample_key, mesh)
    if not np.all(np.isfinite(images)):
      logging.warning("step %d: non-finite values in the sample grid (config.sample.sampler=%r)",
                      step, config.sample.sampler)
    if jax.process_index() == 0:
      path = io.save_grid(os.path.join(workdir, "samples", f"step_{step:07d}.png"), images, rows)
      logging.info("Wrote samples to %s", path)

  def evaluate(step):
    if evaluator is not None:
      results = evaluator(step, current().ema_params, extra={"train_seconds": train_seconds})
      logging.info("step %d evaluation: %s", step, {k: v for k, v in results.items()
                                                    if isinstance(v, float)})

  # train_seconds: wall time of this process's training so far, without the time spent
  # sampling grids and evaluating (quality per compute, docs/benchmarks.md).
  pending, t_last, s_last, train_seconds = [], time.time(), step, 0.0
  t_train = time.time()
  while step < num_steps:
    metrics = run_step(next(data_iter), jax.random.fold_in(step_root, step))
    step += 1
    pending.append(metrics)
    if tc.on_nonfinite == "stop" and int(_first(metrics["nonfinite"])):
      mngr.wait_until_finished()
      raise FloatingPointError(
          f"non-finite loss or gradients at step {step} (config.train.on_nonfinite="
          f"'stop'); the update was not applied and the checkpoints in "
          f"{mngr.directory} are intact")
    if step % tc.log_every == 0 or step == num_steps:
      host = jax.device_get(pending)
      means = {k: float(np.mean([_first(m[k]) for m in host])) for k in host[0]}
      means["nonfinite"] = float(np.sum([_first(m["nonfinite"]) for m in host]))
      now = time.time()
      rate = (step - s_last) / max(now - t_last, 1e-9)
      means["steps_per_sec"] = rate
      writer.write(step, means)
      if jax.process_index() == 0:
        logging.info("step %d/%d  loss %.5f  %.2f steps/s  ETA %s", step, num_steps,
                     means["loss"], rate, _eta((num_steps - step) / max(rate, 1e-9)))
      pending, t_last, s_last = [], now, step
    preempted = preemption.reached(step)
    if preempted or step == num_steps or (tc.checkpoint_every and step % tc.checkpoint_every == 0):
      save(step)
    due = evaluator is not None and (step % config.eval.every == 0 or step == num_steps)
    if due:
      jax.block_until_ready(current())  # steps run asynchronously: count the finished ones
    train_seconds += time.time() - t_train
    if tc.sample_every and step % tc.sample_every == 0 and step != num_steps:
      sample_grid(step)
    if due and step != num_steps and not preempted:
      evaluate(step)
    t_train = time.time()
    if preempted:
      logging.warning("Preempted: saved step %d; exiting.", step)
      break
  if step == num_steps and latest != num_steps:
    sample_grid(step)
    evaluate(step)
  mngr.wait_until_finished()
  mngr.close()
  writer.close()
  return current()


def _compile_step(config, task, mesh, shardings, state):
  """(run_step(host_batch, key) -> metrics, current() -> the state on `shardings`):
  the generic step of `task` compiled with jit over the mesh, or with pmap over its
  devices (config.train.parallel), state held between calls (donated). Metrics are
  scalars under jit, one copy per device under pmap (`_first` reads either)."""
  body = step_lib.make_train_step(task)
  held = {"state": state}
  if config.train.parallel == "jit":
    repl, batch_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    step_fn = jax.jit(body, in_shardings=(shardings, batch_sh, repl),
                      out_shardings=(shardings, repl), donate_argnums=(0,))

    def run_step(batch, key):
      held["state"], metrics = step_fn(held["state"], parallel.host_to_global(batch, mesh), key)
      return metrics
    return run_step, lambda: held["state"]

  devices = list(mesh.devices.flat)
  if jax.process_count() > 1 or config.mesh.fsdp != 1:
    raise ValueError("config.train.parallel='pmap' replicates the state on the devices of "
                     "one host: it needs config.mesh.fsdp=1 and a single process (use 'jit' "
                     "for FSDP and multi-host runs)")
  step_fn = parallel.pmap_step(body, devices=devices)
  held["replicated"] = parallel.replicate(jax.device_get(state), len(devices))
  held["fresh"] = True

  def run_step(batch, key):
    held["replicated"], metrics = step_fn(
        held["replicated"], parallel.split_for_pmap(batch, len(devices)), key)
    held["fresh"] = False
    return metrics  # [devices] each, equal on every device (pmean): read with _first

  def current():
    if not held["fresh"]:  # the jit layout, for checkpoints, grids and evaluation
      held["state"] = jax.device_put(parallel.unreplicate(held["replicated"]), shardings)
      held["fresh"] = True
    return held["state"]
  return run_step, current


def _first(value):
  """A metric on the host: a scalar (jit) or the first of its per-device copies (pmap,
  all equal after the pmean), read without a device program."""
  return np.asarray(jax.device_get(value)).reshape(-1)[0]


def _compile_init(init_fn, shardings, key):
  """jit of the state initialiser, placed on its shardings. It runs once, so on CPU
  it is compiled without LLVM optimisation (XLA's CPU compile of the random
  initialisers dominates start-up otherwise: ~20 s → ~4 s for a small U-Net)."""
  lowered = jax.jit(init_fn, out_shardings=shardings).lower(key)
  if jax.default_backend() == "cpu":
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
  return lowered.compile()


def _check_compatible(mngr, step: int, config, workdir: str) -> None:
  saved = config_lib.from_json(checkpoint.read_meta(mngr, step)["config"])
  diffs = config_lib.structural_diff(saved, config)
  if diffs:
    raise ValueError(
        f"workdir {workdir} holds a checkpoint (step {step}) from an incompatible config:\n  "
        + "\n  ".join(diffs)
        + "\nUse a new --workdir, or the checkpoint's values. Nothing was changed.")


def _eta(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}"
