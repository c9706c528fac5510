"""What every distillation task shares: a teacher run as a frozen component, and a
student that is a diffusion model of the same architecture.

A distillation run's config is its teacher's with config.task set to the method, a
config.distill section naming the teacher, and the method's own section; the sections
that define the network and what it denoises (`SAME`) must equal the teacher's (checked
when the run trains, naming every key that differs). The student then has the
teacher's architecture, path, prediction and conditioning, is initialised from the
teacher's parameters (config.distill.init), and samples through the diffusion task's
generator with the run's own config.sample (e.g. 4 DDIM steps).

State layout (one TrainState, `state.init_state`):
    params      {"student": the student network, "teacher": the teacher network
                 (frozen: no optimizer state, never updated), ...method entries}
    ema_params  {"student": its EMA}
The teacher's parameters live in the state, so they are sharded by the run's mesh
rules like the student's, are an argument of the compiled step (not a constant), and
a resumed run uses exactly the teacher it started with. A teacher may itself be a
distillation run (progressive distillation's chain N → N/2 → …): its `Denoiser`
capability says where its network is. The teacher is read only when the run trains;
sampling a finished student needs neither the teacher's workdir nor its checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config as config_lib, runs
from diffusion_jax.training import tasks
from diffusion_jax.training.tasks import latent as latent_lib
from diffusion_jax.training.tasks.base import Denoiser

__all__ = ["SAME", "check_same", "check_teacher", "cfg_prediction", "draw",
           "draw_guidance", "drop_labels", "guidance_weights",
           "on_student", "student", "teacher", "teacher_inputs", "text_cond"]

_W = 0x7D17  # fold-in salt of the per-example guidance weight w

# Sections (or keys) a student shares with its teacher: the network and what it
# denoises. model.guidance_input may differ (guidance distillation adds the w input).
SAME = ("model", "diffusion.path", "diffusion.prediction", "diffusion.num_steps",
        "diffusion.beta_schedule", "diffusion.beta_min", "diffusion.beta_max",
        "diffusion.sigma_min", "diffusion.sigma_max", "diffusion.rho",
        "diffusion.sigma_data", "data.name", "data.image_size", "text", "latent",
        "superres.low_res")
_MAY_DIFFER = ("model.guidance_input",) + config_lib.COMPUTE_ONLY_KEYS


def _flat(config) -> dict:
  out = {}

  def walk(prefix, v):
    if isinstance(v, dict):
      for k, w in v.items():
        walk(f"{prefix}.{k}" if prefix else k, w)
    else:
      out[prefix] = v
  walk("", json.loads(config_lib.to_json(config)))
  return out


def check_same(config, teacher_config, teacher_workdir: str, role: str = "teacher",
               key: str = "config.distill.teacher", keys=SAME) -> None:
  """Raises naming every key of `keys` (default `SAME`) where the run's config differs
  from its teacher's (config.model.guidance_input and compute-only keys may differ);
  `role` and `key` name the other run in the message (a fine-tuning run's 'base run',
  config.init.from_workdir)."""
  mine, theirs = _flat(config), _flat(teacher_config)
  diffs = [f"{k}: {role} has {theirs.get(k)!r}, this run has {mine.get(k)!r}"
           for k in sorted(set(mine) | set(theirs))
           if any(k == s or k.startswith(s + ".") for s in keys)
           and k not in _MAY_DIFFER and mine.get(k) != theirs.get(k)]
  if diffs:
    raise ValueError(f"this run's config differs from its {role}'s "
                     f"({key}={teacher_workdir}) where they must agree:\n  "
                     + "\n  ".join(diffs))


@functools.lru_cache(maxsize=4)
def _load(workdir: str, step, params: str):
  """(config, info, Denoiser, numpy network parameters) of a teacher run; concrete even
  when first asked for inside a trace (init and the step are compiled)."""
  with jax.ensure_compile_time_eval():
    comp = runs.load(workdir, step=step, params=params)
    den = tasks.make(comp.config, comp.info).denoiser
    if den is None:
      raise ValueError(f"config.distill.teacher={workdir} is a config.task="
                       f"{comp.config.task!r} run, which is no denoiser (a diffusion run, "
                       "or a distillation run's student)")
    net = jax.tree.map(np.asarray, jax.device_get(den.network(comp.params)))
    return comp.config, comp.info, den, net


def teacher(config):
  """(Denoiser, numpy network parameters) of config.distill.teacher, checked against
  the run's config (`check_same`)."""
  d = config.distill
  if not d.teacher:
    raise ValueError(f"config.task={config.task!r} needs config.distill.teacher (the "
                     "workdir of a trained diffusion run)")
  t_config, _, den, net = _load(d.teacher, d.teacher_step, d.teacher_params)
  check_same(config, t_config, d.teacher)
  return den, net


def student(config, info, **kw):
  """The diffusion Task of the run's own config: the student's network (its `denoiser`
  capability), its generator and its initialiser. kw: `diffusion.make`'s."""
  from diffusion_jax.training.tasks import diffusion  # a sibling task, made on demand
  base = diffusion.make(config, info, **kw)
  if base.denoiser is None:
    raise ValueError("distillation of super-resolution models is not supported "
                     "(config.superres.low_res)")
  return base


def init_params(config, base, key):
  """The student's initial network parameters: the teacher's (config.distill.init =
  'teacher') or the diffusion task's random initialisation ('random')."""
  fresh = base.init(key).params
  if config.distill.init == "random":
    return fresh
  _, net = teacher(config)
  shapes = jax.tree.map(jnp.shape, fresh)
  if jax.tree.structure(shapes) != jax.tree.structure(jax.tree.map(np.shape, net)) or \
      jax.tree.leaves(shapes) != jax.tree.leaves(jax.tree.map(np.shape, net)):
    raise ValueError("the teacher's parameters do not fit the student's network "
                     "(config.model.guidance_input adds parameters: use "
                     "config.distill.init='random' or `guidance_distillation`, which "
                     "initialises the new ones)")
  return jax.tree.map(jnp.asarray, net)


def draw(config, info):
  """fn(batch, keys) -> x₀ [B, *shape]: the clean examples the student learns on (the
  batch's pictures; a latent space's scaled latents, `latent.LatentSpace.draw`)."""
  space = latent_lib.space(config, info)
  if space is None:
    return lambda batch, keys: batch["image"]
  return space.draw


def cfg_prediction(den: Denoiser, net, x, t, labels, cond, guidance, **kw):
  """The prediction of `den` with classifier-free guidance weight w (scalar or [B]):
  (1 + w)·f(y) − w·f(∅) (Ho & Salimans 2022) in one batched call of [x; x], or the
  network's own w input for a guidance-distilled (`guidance_input`) denoiser; w = 0
  or an unconditional model: one call."""
  B = x.shape[0]
  w = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (B,))
  if den.guidance_input:
    return den.apply(net, x, t, labels, cond, guidance=w, **kw)
  if not den.null:
    return den.apply(net, x, t, labels, cond, **kw)
  # cond's text entries [B] are tiled to the stacked batch by the network's caller.
  both = den.apply(net, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([labels, jnp.full_like(labels, den.null)]), cond, **kw)
  c, u = both[:B], both[B:]
  w = w.reshape((B,) + (1,) * (x.ndim - 1))
  return (1.0 + w) * c - w * u


def on_student(base):
  """The student run's capabilities from its diffusion Task `base`: the generator and
  the denoiser over params["student"] (EMA or raw trees both hold that entry)."""
  gen = base.generator

  def sample(**kw):
    fn = gen.sample(**kw)
    return lambda params, *a, **k: fn(params["student"], *a, **k)

  generator = dataclasses.replace(gen, sample=sample)
  denoiser = dataclasses.replace(base.denoiser, network=lambda params: params["student"])
  return generator, denoiser


DISTILLATION = ("progressive", "guidance_distillation", "consistency",
                "adversarial_distillation")


def teacher_guidance(config) -> float:
  """The CFG weight of the teacher's targets: config.distill.guidance, else the
  teacher's own config.sample.guidance — so in a chain of students (progressive
  distillation) the first teacher's w is baked into the first student, which samples
  with w = 0 and so passes w = 0 on. An explicit w ≠ 0 on a distilled teacher that
  samples with w = 0 (its guidance already baked in) is an error: it would compound."""
  t_config = _load(config.distill.teacher, config.distill.teacher_step,
                   config.distill.teacher_params)[0]
  if config.distill.guidance is None:
    return float(t_config.sample.guidance)
  if (config.distill.guidance and t_config.task in DISTILLATION
      and not t_config.sample.guidance and not t_config.model.guidance_input):
    raise ValueError(f"config.distill.guidance={config.distill.guidance}: the teacher "
                     f"{config.distill.teacher} is a distilled student that samples with "
                     "guidance 0 (its teacher's guidance is baked in); leave "
                     "config.distill.guidance unset (None) to distil it as it samples")
  return float(config.distill.guidance)


def text_cond(batch) -> dict:
  """The text entries of a batch the networks read ("tokens", "text_embedding")."""
  return {k: batch[k] for k in ("tokens", "text_embedding") if k in batch}


def check_teacher(den: Denoiser, teacher_den: Denoiser) -> None:
  """A student keeps its teacher's w input (or its absence)."""
  if den.guidance_input != teacher_den.guidance_input:
    raise ValueError("config.model.guidance_input must be the teacher's (a student of a "
                     "guidance-distilled teacher keeps its w input)")


def guidance_weights(config, den: Denoiser, keys):
  """Per-example CFG weights w [B] of the teacher's targets: drawn from
  U[w_min, w_max] (config.guidance_distillation) for a w-input teacher, else the one
  fixed `teacher_guidance`."""
  if den.guidance_input:
    return draw_guidance(config, keys)
  return jnp.full(keys.shape[:1], teacher_guidance(config), jnp.float32)


def draw_guidance(config, keys, salt: int = _W):
  """w [B] ~ U[w_min, w_max] (config.guidance_distillation), from fold_in(key_i, salt)."""
  g = config.guidance_distillation
  u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, salt)))(keys)
  return g.w_min + (g.w_max - g.w_min) * u


def teacher_inputs(config, den: Denoiser, batch, keys, drop_salt: int):
  """(teacher Denoiser, w [B], labels [B], text cond) of a batch for the student `den`
  of a teacher-driven loss (progressive, consistency distillation). A teacher guidance
  w ≠ 0 without a w input is baked into the student (config.sample.guidance must then
  be 0, else an error) and labels are kept; otherwise labels drop to ∅ with p =
  config.diffusion.label_dropout (salt `drop_salt`), so the student keeps CFG."""
  teacher_den, _ = teacher(config)
  check_teacher(den, teacher_den)
  w = guidance_weights(config, teacher_den, keys)
  baked = (not teacher_den.guidance_input) and teacher_guidance(config) != 0
  if baked and config.sample.guidance != 0:
    raise ValueError(f"the teacher's guidance w={teacher_guidance(config)} is baked into "
                     "the student: set config.sample.guidance=0 (or "
                     "config.distill.guidance=0 to keep classifier-free guidance)")
  labels = batch["label"].astype(jnp.int32)
  if not baked:
    labels = drop_labels(config, den, labels, keys, drop_salt)
  return teacher_den, w, labels, text_cond(batch)


def drop_labels(config, den: Denoiser, labels, keys, salt: int):
  """Labels dropped to ∅ with p = config.diffusion.label_dropout (per example, salt
  `salt`), so a student keeps classifier-free guidance; unchanged for an unconditional
  or a w-input student."""
  if not den.null or den.guidance_input:
    return labels
  drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, salt),
                                                 config.diffusion.label_dropout))(keys)
  return jnp.where(drop, den.null, labels)
