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
On resume the whole config difference is logged; a change of a key that would make
the resumed run a different one without error (`GUARDED_KEYS`: the seed, the batch
size and data subset, the diffusion path and prediction) is refused unless
config.train.allow_changes names it; a latest checkpoint that cannot be read is set
aside (`checkpoint.set_aside`) and the previous complete one resumed, with a warning.
SIGTERM (preemption) saves a checkpoint at one step agreed by every process and
returns cleanly, also when it arrives during a periodic evaluation.
"""
from __future__ import annotations

import math
import signal
import tempfile
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import checkpoint, config as config_lib, data, io, parallel, runs, writers
from diffusion_jax.training import generate, step as step_lib, tasks, warmstart

# Keys whose change on resume would silently give another run: refused by name unless
# config.train.allow_changes lists them. (Structural keys — the model, the task — are
# refused always: `config.structural_diff`.) A changed data.batch_size keeps the data
# iterator at the same number of examples seen.
GUARDED_KEYS = ("seed", "data.batch_size", "data.split", "data.labels", "data.max_examples",
                "data.paired_name", "diffusion.path", "diffusion.prediction",
                "diffusion.beta_schedule", "diffusion.num_steps")


class Preempted(Exception):
  """Raised by `Preemption.check` inside an evaluation to stop it (the loop saves)."""


class Preemption:
  """SIGTERM (preemption) → one step at which every process saves.

  One process: a Python SIGTERM handler records the signal. Several processes
  (`jax.distributed.initialize`): JAX's preemption service installs its own SIGTERM
  notifier, which a Python handler would replace, so none is installed; `reached`
  asks `multihost_utils.reached_preemption_sync_point`, which agrees across processes
  on one point to stop at. Every process calls `reached` at the same points (after
  each step, before a sample grid, between evaluation batches through `check`),
  numbered by one counter, as that protocol needs.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._points = 0
    self._multi = False

  def __enter__(self):
    self._multi = jax.process_count() > 1
    if not self._multi:
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

  def reached(self) -> bool:
    """True from the agreed point on (on every process at the same call)."""
    if not self.requested and self._multi:
      self._points += 1
      self.requested = bool(multihost_utils.reached_preemption_sync_point(self._points))
    return self.requested

  def check(self) -> None:
    """Raises `Preempted` once preemption is reached (for work between steps)."""
    if self.reached():
      raise Preempted


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
  """Trains config in workdir (local or a cloud URI; resuming if it holds a
  checkpoint). Returns the state.

  devices: the devices of the mesh (default: every device of every host).
  make_evaluator(config, info, workdir, mesh) -> evaluate(step, params, *, extra,
    stop) -> results: the periodic evaluator (config.eval.every > 0), built before the
    first step so a bad config.eval fails at once; `evaluation.make_evaluator` is one.
    It calls stop() between batches (which raises to abandon it on preemption).
  SIGTERM at any point (even while compiling) saves after the next step and returns.
  Any error leaves the checkpoints already started complete.
  """
  with Preemption() as preemption:
    return _train(config, workdir, devices, preemption, make_evaluator)


def _train(config, workdir, devices, preemption, make_evaluator):
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.mesh, devices)
  parallel.check_batch_size(config.data.batch_size, mesh)
  info = dataset_info(config)
  task = tasks.make(config, info)
  init_key, step_root, sample_key = keys(config.seed)
  root = io.path(workdir)

  abstract = jax.eval_shape(task.init, init_key)
  shardings = parallel.state_shardings(mesh, abstract, config.mesh)
  mngr = checkpoint.manager(workdir, max_to_keep=config.train.keep_checkpoints,
                            async_save=config.train.async_checkpointing)
  meta = runs.metadata(config, info)
  data_iter = data.make_train_iterator(config.data, seed=config.seed, text=task.text)

  latest = _resume(mngr, config, abstract, shardings, workdir, data_iter)
  if latest is None:
    state = _compile_init(task.init, shardings, init_key)(init_key)
    state = warmstart.apply(config, state, mesh, shardings)
    if config.init.from_workdir:
      logging.info("Initialised from %s (%s parameters).", config.init.from_workdir,
                   config.init.params)
  else:
    state, latest = latest
  for name, trained, total in warmstart.trainable_summary(task.players, abstract.params):
    logging.info("Trainable parameters of %s: %d of %d (%.2f%%).", name, trained, total,
                 100.0 * trained / max(total, 1))

  if jax.process_index() == 0:
    io.write_atomic(root / "config.json", config_lib.to_json(config))

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
  num_steps, tc = config.train.num_steps, config.train
  step = int(jax.device_get(state.step))
  writer = writers.MetricWriter(workdir, start_step=step)
  saved = {"step": latest}

  def save(step):
    if saved["step"] == step:
      return
    checkpoint.save(mngr, step, current(), data_iter.get_state(), meta)
    saved["step"] = step
    if task.adapters is not None:  # the small trained parts alone (a fine-tuning run)
      tensors, extra = task.adapters.export(jax.device_get(current().ema_params))
      if jax.process_index() == 0:
        io.save_tensors(root / "adapters" / f"{step}.safetensors", tensors,
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
      path = io.save_grid(root / "samples" / f"step_{step:07d}.png", images, rows)
      writer.write_images(step, "samples", io.grid_image(images, rows))
      logging.info("Wrote samples to %s", path)

  def evaluate(step):
    """Runs the evaluator; False when preemption stopped it. An error in it is
    reported; the checkpoint of this step is written and then training continues or
    stops (config.eval.on_error)."""
    try:
      results = evaluator(step, current().ema_params, extra={"train_seconds": train_seconds},
                          stop=preemption.check)
    except Preempted:
      logging.warning("Preempted during the evaluation of step %d.", step)
      return False
    except Exception as e:  # noqa: BLE001 — reported, then config.eval.on_error decides
      logging.exception("step %d: the evaluation failed", step)
      save(step)
      mngr.wait_until_finished()
      if config.eval.on_error == "stop":
        raise RuntimeError(
            f"the evaluation at step {step} failed ({type(e).__name__}: {e}); the checkpoint "
            f"of step {step} is saved in {mngr.directory}: rerun to resume, or set "
            "config.eval.on_error='continue' to train on past evaluation errors") from e
      return True
    logging.info("step %d evaluation: %s", step, {k: v for k, v in results.items()
                                                  if isinstance(v, float)})
    return True

  nonfinite = _NonFinite(tc, mngr)
  profile = _Profile(tc.profile_steps, root)
  # train_seconds: wall time of this process's training so far, without the time spent
  # sampling grids and evaluating (quality per compute, docs/benchmarks.md).
  pending, t_last, s_last, train_seconds = [], time.time(), step, 0.0
  t_train = time.time()
  try:
    while step < num_steps:
      profile.before(step + 1)
      metrics = run_step(next(data_iter), jax.random.fold_in(step_root, step))
      step += 1
      pending.append((step, metrics))
      profile.after(step, current)
      preempted = preemption.reached()
      checkpoint_due = preempted or step == num_steps or (
          tc.checkpoint_every and step % tc.checkpoint_every == 0)
      if step % tc.log_every == 0 or step == num_steps or checkpoint_due:
        nonfinite.check(pending)  # reads this interval's metrics (no per-step host sync)
      if step % tc.log_every == 0 or step == num_steps:
        means = _means(jax.device_get([m for _, m in pending]))
        now = time.time()
        rate = (step - s_last) / max(now - t_last, 1e-9)
        means["steps_per_sec"] = rate
        writer.write(step, means)
        if jax.process_index() == 0:
          logging.info("step %d/%d  loss %.5f  %.2f steps/s  ETA %s", step, num_steps,
                       means["loss"], rate, _eta((num_steps - step) / max(rate, 1e-9)))
        pending, t_last, s_last = [], now, step
      if checkpoint_due:
        save(step)
      due = evaluator is not None and (step % config.eval.every == 0 or step == num_steps)
      if due:
        jax.block_until_ready(current())  # steps run asynchronously: count the finished ones
      train_seconds += time.time() - t_train
      if (not preempted and tc.sample_every and step % tc.sample_every == 0
          and step != num_steps):
        preempted = preemption.reached()
        if not preempted:
          sample_grid(step)
      if due and step != num_steps and not preempted:
        preempted = not evaluate(step)
      t_train = time.time()
      if preempted:
        save(step)
        logging.warning("Preempted: saved step %d; exiting.", step)
        break
    if step == num_steps and latest != num_steps and not preemption.requested:
      sample_grid(step)
      if evaluator is not None and not evaluate(step):
        logging.warning("Preempted: the final evaluation of step %d was not finished; "
                        "rerun to evaluate.", step)
  finally:
    profile.close()
    mngr.wait_until_finished()  # whatever happened, the checkpoints started are complete
    mngr.close()
    writer.close()
  return current()


def _means(host_metrics: list[dict]) -> dict:
  means = {k: float(np.mean([_first(m[k]) for m in host_metrics])) for k in host_metrics[0]}
  means["nonfinite"] = float(np.sum([_first(m["nonfinite"]) for m in host_metrics]))
  return means


class _NonFinite:
  """config.train.on_nonfinite and max_nonfinite, read from the metrics of the steps
  since the last check (at the log interval and before a checkpoint): no host sync per
  step. A non-finite step's update is never applied, so every checkpoint is finite."""

  def __init__(self, tc, mngr):
    self.mode, self.limit, self.mngr = tc.on_nonfinite, tc.max_nonfinite, mngr
    self.run = 0  # consecutive non-finite steps so far
    self.checked = 0  # the last step read (a log interval may be read twice)

  def check(self, pending) -> None:
    new = [(s, m["nonfinite"]) for s, m in pending if s > self.checked]
    flags = [(s, int(_first(f))) for (s, _), f in zip(new, jax.device_get([f for _, f in new]))]
    if not flags:
      return
    self.checked = flags[-1][0]
    bad = [s for s, f in flags if f]
    if self.mode == "stop" and bad:
      self.mngr.wait_until_finished()
      raise FloatingPointError(
          f"non-finite loss or gradients at step {bad[0]} (config.train.on_nonfinite="
          f"'stop'); that update was not applied and the checkpoints in "
          f"{self.mngr.directory} are intact")
    for s, f in flags:
      self.run = self.run + 1 if f else 0
      if self.limit and self.run >= self.limit:
        self.mngr.wait_until_finished()
        raise FloatingPointError(
            f"{self.run} non-finite steps in a row up to step {s} (config.train."
            f"max_nonfinite={self.limit}): the run has diverged; the updates were skipped "
            f"and the checkpoints in {self.mngr.directory} are intact (lower "
            "config.optim.lr, or set config.train.max_nonfinite=0 to skip forever)")


class _Profile:
  """A jax.profiler trace of steps first..last (config.train.profile_steps) into
  <workdir>/tensorboard (TensorBoard's profile tab). A cloud workdir gets the trace
  written locally and copied there when it stops."""

  def __init__(self, steps, root):
    self.first, self.last = (tuple(steps) if steps else (0, -1))
    self.root, self.local, self.active = root, None, False

  def before(self, step):
    if step == self.first:
      target = self.root / "tensorboard"
      if io.is_remote(target):
        self.local = tempfile.mkdtemp(prefix="diffusion_jax_profile_")
      jax.profiler.start_trace(self.local or str(target))
      self.active = True
      logging.info("Profiling steps %d..%d into %s", self.first, self.last, target)

  def after(self, step, current):
    if self.active and step == self.last:
      jax.block_until_ready(current())
      self.close()

  def close(self):
    if not self.active:
      return
    jax.profiler.stop_trace()
    self.active = False
    if self.local is not None:
      io.upload_tree(self.local, self.root / "tensorboard")


def _resume(mngr, config, abstract, shardings, workdir, data_iter):
  """(state, step) of the newest readable checkpoint, with the data iterator set to
  it; None for a fresh workdir. Raises ValueError for a checkpoint of another config
  (nothing is changed). Unreadable newer checkpoints are set aside, with a warning
  naming them and the one resumed; if none is readable, ValueError names each
  problem and nothing is moved."""
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = checkpoint.read_meta(mngr, step)
      saved = config_lib.from_json(meta["config"])
    except Exception as e:  # noqa: BLE001 — unreadable: try the previous one
      damaged.append((step, f"its metadata: {type(e).__name__}: {e}"))
      continue
    runs.check_format(meta, f"{mngr.directory}/{step}")
    _check_compatible(saved, config, step, workdir)
    try:
      problems = checkpoint.check_structure(mngr, step, abstract)
    except checkpoint.Unreadable as e:
      damaged.append((step, f"its array metadata: {e}"))
      continue
    if problems:
      raise ValueError(
          f"workdir {workdir} holds a checkpoint (step {step}) whose state does not match "
          "this config; use a new --workdir. Nothing was changed. Differences:\n  "
          + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
    try:
      state, data_state, _ = checkpoint.read(mngr, step, abstract, shardings)
    except checkpoint.Unreadable as e:
      damaged.append((step, f"its arrays: {e}"))
      continue
    for bad, why in damaged:
      moved = checkpoint.set_aside(mngr, bad)
      logging.warning("The checkpoint of step %d in %s cannot be read (%s); it was moved to "
                      "%s, and training resumes from step %d.", bad, mngr.directory, why,
                      moved, step)
    data_iter.set_state(_data_state(data_state, saved, config))
    logging.info("Resumed from %s at step %d.", mngr.directory, step)
    return state, step
  if damaged:
    raise ValueError(f"no checkpoint in {mngr.directory} can be read; nothing was changed:\n  "
                     + "\n  ".join(f"step {s}: {why}" for s, why in damaged))
  return None


def _data_state(data_state: dict, saved, config) -> dict:
  """The saved data iterator state, converted to config.data.batch_size when an
  allowed change of it (train.allow_changes) altered it: the iterator counts batches,
  so it continues after the same number of examples (rounded up to a whole batch)."""
  old, new = saved.data.batch_size, config.data.batch_size
  if old == new or "next_index" not in data_state:
    return data_state
  seen = data_state["next_index"] * old
  out = dict(data_state, next_index=math.ceil(seen / new))
  logging.warning("data.batch_size %d -> %d: the data iterator continues after %d examples "
                  "(%d batches of %d%s).", old, new, out["next_index"] * new,
                  out["next_index"], new, "" if seen % new == 0 else
                  f"; {out['next_index'] * new - seen} examples skipped to a whole batch")
  return out


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


def _check_compatible(saved, config, step: int, workdir: str) -> None:
  """Logs the whole config difference of a resume; raises ValueError naming every
  structural change, and every change of a GUARDED_KEYS key that
  config.train.allow_changes does not list."""
  changes = config_lib.diff(saved, config)
  if changes:
    logging.info("Resuming step %d of %s with a changed config:\n  %s", step, workdir,
                 "\n  ".join(changes))
  diffs = config_lib.structural_diff(saved, config)
  if diffs:
    raise ValueError(
        f"workdir {workdir} holds a checkpoint (step {step}) from an incompatible config:\n  "
        + "\n  ".join(diffs)
        + "\nUse a new --workdir, or the checkpoint's values. Nothing was changed.")
  allowed = set(config.train.allow_changes)
  guarded = config_lib.diff(saved, config, lambda k: any(
      k == g or k.startswith(g + ".") for g in GUARDED_KEYS if g not in allowed))
  if guarded:
    raise ValueError(
        f"workdir {workdir} holds a checkpoint (step {step}) trained with other values of:\n  "
        + "\n  ".join(guarded)
        + "\nResuming would silently give another run. Use the checkpoint's values, a new "
        "--workdir, or allow the change by name, e.g. --config.train.allow_changes="
        f"'{tuple(sorted({g.split(':')[0] for g in guarded}))!r}'. Nothing was changed.")


def _eta(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}"
