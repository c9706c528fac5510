"""Guidance distillation (Meng, Rombach, Gao, Kingma, Ermon, Ho & Salimans 2023, "On
Distillation of Guided Diffusion Models", stage one, §4.1 / Algorithm 1): a student that
takes the guidance weight w as an input and reproduces, in one network call, the
classifier-free-guided prediction its teacher makes in two.

The student is the teacher's network with a w input (config.model.guidance_input=True;
`nets.layers.GuidanceEmbedding`: sinusoidal features of w, an MLP, added to the time
embedding). It starts from the teacher's parameters, the w embedding freshly
initialised with its last layer zero (`merge_params`), so at step 0 it is exactly the
teacher's conditional model for every w. A training example draws

    t, z, x_t = a_t·x + b_t·z, y   as the teacher's own training does (`losses.noise_example`
                                   on config.diffusion: its time sampling, and the label
                                   replaced by ∅ with p = config.diffusion.label_dropout)
    w ~ U[w_min, w_max]            (config.guidance_distillation)

and regresses onto the teacher's CFG combination (Ho & Salimans 2022) in the
prediction's own space (x, ε, v, velocity, EDM's F, …: every conversion between them
is affine in the prediction with coefficients of x_t and t only, so CFG there is CFG of
x̂₀ — Meng et al.'s x-space target — and of ε̂ alike):

    target = (1 + w)·f(x_t, t, y) − w·f(x_t, t, ∅)     (`distill.cfg_prediction`)
    loss   = λ(t)·‖f_student(x_t, t, y, w) − target‖²  (λ: config.diffusion.loss_weight,
                                                         the teacher's own weighting)

For an example whose label was dropped to ∅ the target is the unconditional f(x_t, ∅)
whatever w (its w is set to 0 in the combination: exactly f(∅)), so the student keeps
the teacher's unconditional model, as a ∅ branch that ignores w; Meng et al. train the
conditional student only, which is config.diffusion.label_dropout=0.

The student samples with any sampler at its own w (config.sample.guidance, or
`--guidance=`): one network call per step where CFG makes two, so half the NFE.
Stage two (Meng et al. §4.2) is progressive distillation (`progressive.py`) with this
run as its teacher: w ~ U[w_min, w_max] goes to both, the student keeps its w input.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from diffusion_jax.diffusion import losses, paths, predictions
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks import distill
from diffusion_jax.training.tasks.base import Player, Task

_W = 0x6D31  # fold-in salt of the per-example w draw


def draw_w(config, keys):
  """Per-example guidance weights w [B] ~ U[w_min, w_max] (config.guidance_distillation),
  from fold_in(key_i, salt): independent of t, z and the label dropout."""
  return distill.draw_guidance(config, keys, _W)


def examples(config, path, null: int, x, labels, keys):
  """(t [B], x_t [B, ...], labels [B], w [B]) of a batch x [B, ...]: t, z, x_t and the
  label dropped to ∅ = `null` with p = config.diffusion.label_dropout as in the
  teacher's training (`losses.noise_example`), and w ~ U[w_min, w_max] (`draw_w`)."""
  t, _, x_t, labels = jax.vmap(
      lambda k, x_, y: losses.noise_example(config.diffusion, path, k, x_, y, null))(
          keys, x, labels.astype(jnp.int32))
  return t, x_t, labels, draw_w(config, keys)


def target(den, net, x_t, t, labels, cond, w):
  """The student's regression target [B, ...]: the teacher `den`'s (parameters `net`)
  CFG prediction (1 + w)·f(x_t, t, y) − w·f(x_t, t, ∅) (`distill.cfg_prediction`, in the
  prediction's own space, float32); for a label that is ∅ exactly f(x_t, t, ∅) (its w
  taken as 0), whatever the student's w."""
  w = jnp.where(labels == den.null, 0.0, w)
  return distill.cfg_prediction(den, net, x_t, t, labels, cond, w).astype(jnp.float32)


def merge_params(teacher, fresh):
  """The student's initial parameters: the teacher's value for every parameter the
  teacher has, the fresh initialisation's for the rest (the w embedding). Raises naming
  every teacher parameter the student lacks or whose shape differs."""
  t_flat = traverse_util.flatten_dict(teacher, sep="/")
  f_flat = traverse_util.flatten_dict(fresh, sep="/")
  problems = [f"{k}: the teacher's {tuple(v.shape)}, the student's "
              f"{tuple(f_flat[k].shape)}" for k, v in t_flat.items()
              if k in f_flat and tuple(v.shape) != tuple(f_flat[k].shape)]
  problems += [f"{k}: the teacher has it, the student does not" for k in t_flat
               if k not in f_flat]
  if problems:
    raise ValueError("the teacher's parameters do not fit the student's network (apart "
                     "from model.guidance_input the model sections must agree):\n  "
                     + "\n  ".join(sorted(problems)))
  merged = {k: jnp.asarray(t_flat[k], f_flat[k].dtype) if k in t_flat else f_flat[k]
            for k in f_flat}
  return traverse_util.unflatten_dict(merged, sep="/")


def _check(config):
  if not config.model.guidance_input:
    raise ValueError("config.task='guidance_distillation' trains a student that takes w as "
                     "an input: set config.model.guidance_input=True")
  g = config.guidance_distillation
  if not g.w_min <= g.w_max:
    raise ValueError(f"config.guidance_distillation.w_min={g.w_min} must be <= "
                     f"config.guidance_distillation.w_max={g.w_max}")
  if config.distill.guidance is not None:
    raise ValueError(f"config.distill.guidance={config.distill.guidance}: a guidance-"
                     "distillation student learns every w in [guidance_distillation.w_min, "
                     "w_max]; leave config.distill.guidance unset (None)")


def _check_teacher(den, teacher_workdir):
  if den.guidance_input:
    raise ValueError(f"config.distill.teacher={teacher_workdir} already takes w as an input "
                     "(model.guidance_input=True): guidance distillation needs a teacher "
                     "with classifier-free guidance (its stage two is config.task="
                     "'progressive')")
  if not den.null:
    raise ValueError(f"config.distill.teacher={teacher_workdir} is unconditional (no ∅ "
                     "label): there is no classifier-free guidance to distil")


def make(config, info) -> Task:
  """Batches as the teacher's. Metrics: loss, the student's grad norm, lr."""
  _check(config)
  base = distill.student(config, info)
  den = base.denoiser
  path = paths.from_config(config.diffusion)
  x0_of = distill.draw(config, info)
  tx, sched = optim.make(config.optim, config.train.num_steps)

  def loss(params, batch, keys, ctx):
    teacher_den, _ = distill.teacher(config)
    _check_teacher(teacher_den, config.distill.teacher)
    x = x0_of(batch, keys)
    B = x.shape[0]
    t, x_t, labels, w = examples(config, path, den.null, x, batch["label"], keys)
    cond = distill.text_cond(batch)
    tgt = jax.lax.stop_gradient(target(teacher_den, params["teacher"], x_t, t, labels, cond, w))
    pred = den.apply(params["student"], x_t, t, labels, cond, guidance=w, train=True,
                     rngs={"dropout": ctx.dropout_key}).astype(jnp.float32)
    per_example = jnp.mean(jnp.square(pred - tgt).reshape(B, -1), axis=1)
    return jnp.mean(predictions.loss_weight(config.diffusion, path, t) * per_example), (
        {}, params)

  players = (Player(loss=loss, tx=tx, schedule=sched, name="student",
                    ema_decay=config.train.ema_decay,
                    mask=optim.trainable(config.optim.trainable)),)

  def init(key):
    teacher_den, teacher_net = distill.teacher(config)
    _check_teacher(teacher_den, config.distill.teacher)
    fresh = base.init(key).params
    student = fresh if config.distill.init == "random" else merge_params(teacher_net, fresh)
    params = {"student": student, "teacher": jax.tree.map(jnp.asarray, teacher_net)}
    return state_lib.init_state(players, params)

  generator, denoiser = distill.on_student(base)
  return Task(init=init, players=players, text=base.text, generator=generator,
              denoiser=denoiser)
