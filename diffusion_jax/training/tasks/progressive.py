"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast
Sampling of Diffusion Models", Algorithm 2): a student that does in one deterministic
DDIM step what its teacher does in two.

On the grid of 2N teacher steps t_0 = t_start > t_1 > … > t_{2N} = 0
(`samplers.spacing.grid` with config.sample.spacing, default uniform; N =
config.sample.num_steps, the student's own number of steps), a training example draws
a student step i ~ U{0, …, N − 1}, t = t_{2i}, t′ = t_{2i+1}, t″ = t_{2i+2}, and
x_t = a_t·x + b_t·ε. The teacher takes two DDIM steps (η = 0; Song et al. 2021 eq. 12
in this library's general path x_t = a(t)·x + b(t)·ε):

    x_s = a_s·x̂₀ + b_s·ε̂,   ε̂ = (x_t − a_t·x̂₀)/b_t,        t → t′ → t″,

with its x̂₀ under classifier-free guidance w (config.distill.guidance, else the
teacher's sample.guidance; baked into the student, which then samples with w = 0) or
with w as an input (a guidance-distilled teacher, Meng et al. 2023: w ~ U[w_min, w_max]
of config.guidance_distillation goes to both). The student's target is the x̃ whose one
DDIM step from t lands where the teacher's two did (Salimans & Ho, Alg. 2):

    x̃ = (x_{t″} − (b_{t″}/b_t)·x_t) / (a_{t″} − (b_{t″}/b_t)·a_t),

(x̃ = x_{t″} at t″ = 0), and its loss is w(t)·‖x̂₀(student) − x̃‖², the student's
prediction (x, v, ε, velocity, …) converted to x̂₀ exactly (`diffusion.predictions`),
with w(t) = max(SNR(t), 1) ('truncated_snr', the paper's choice for x-prediction),
SNR(t) + 1 ('snr_plus_one', its choice for v-prediction) or 1 ('uniform').

Repeated halving N → N/2 → … → 1 is a chain of runs, each student the next one's
teacher (`launch/progressive.py`); every student samples with `ddim` and its own N.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import paths, predictions
from diffusion_jax.samplers import spacing as spacing_lib
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks import distill
from diffusion_jax.training.tasks.base import Player, Task

WEIGHTINGS = ("truncated_snr", "snr_plus_one", "uniform")
_T, _DROP = 0x7D15, 0x7D16  # fold-in salts: step index, label dropout


def ddim_step(path, x0, x_t, t, s):
  """One DDIM step (η = 0) from t to s < t given x̂₀ [B, ...]; t, s [B] with b_t > 0."""
  a_t, b_t = (_b(v, x_t) for v in path.ab(t))
  a_s, b_s = (_b(v, x_t) for v in path.ab(s))
  return a_s * x0 + b_s * (x_t - a_t * x0) / b_t


def target(path, x_t, x_s2, t, s2):
  """x̃ with DDIM(x_t, x̂₀ = x̃; t → s2) = x_s2 (Salimans & Ho 2022, Alg. 2)."""
  a_t, b_t = (_b(v, x_t) for v in path.ab(t))
  a_s, b_s = (_b(v, x_t) for v in path.ab(s2))
  r = b_s / b_t
  return (x_s2 - r * x_t) / (a_s - r * a_t)


def weight(kind: str, path, t):
  """w(t) [B] of the x̂₀-space loss."""
  if kind == "uniform":
    return jnp.ones_like(t)
  snr = path.snr(t)
  if kind == "truncated_snr":
    return jnp.maximum(snr, 1.0)
  if kind == "snr_plus_one":
    return snr + 1.0
  raise ValueError(f"config.progressive.weighting={kind!r}: expected one of {WEIGHTINGS}")


def _b(v, x):
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _check(config):
  p = config.progressive
  if p.weighting not in WEIGHTINGS:
    raise ValueError(f"config.progressive.weighting={p.weighting!r}: expected one of "
                     f"{WEIGHTINGS}")
  if config.sample.sampler != "ddim" or config.sample.ddim.eta != 0.0:
    raise ValueError("a progressive-distillation student samples with deterministic DDIM: "
                     f"set config.sample.sampler='ddim' (is {config.sample.sampler!r}) and "
                     f"config.sample.ddim.eta=0 (is {config.sample.ddim.eta})")
  if config.sample.get("times") is not None:
    raise ValueError("config.sample.times: progressive distillation halves a spacing's "
                     "grid (config.sample.spacing), not an explicit one")


def make(config, info) -> Task:
  """Batches as the teacher's. Metrics: loss, the student's grad norm, lr."""
  _check(config)
  base = distill.student(config, info)
  den = base.denoiser
  path = paths.from_config(config.diffusion)
  n = int(config.sample.num_steps)
  grid = spacing_lib.grid(path, 2 * n, config.sample.spacing or "uniform")
  x0_of = distill.draw(config, info)
  tx, sched = optim.make(config.optim, config.train.num_steps)

  def loss(params, batch, keys, ctx):
    teacher_den, w, labels, cond = distill.teacher_inputs(config, den, batch, keys, _DROP)
    x = x0_of(batch, keys)
    B = x.shape[0]
    i = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, _T), (), 0, n))(keys)
    t, t1, t2 = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), x.shape[1:]))(keys)
    a, b = path.ab(t)
    x_t = _b(a, x) * x + _b(b, x) * eps
    teacher_net = params["teacher"]

    def teacher_x0(x_, t_):
      pred = distill.cfg_prediction(teacher_den, teacher_net, x_, t_, labels, cond, w)
      return predictions.to_x0_eps(path, teacher_den.prediction, pred.astype(jnp.float32),
                                   x_, t_)[0]

    x_t1 = ddim_step(path, teacher_x0(x_t, t), x_t, t, t1)
    x_t2 = ddim_step(path, teacher_x0(x_t1, t1), x_t1, t1, t2)
    x_tilde = jax.lax.stop_gradient(jnp.where(_b(t2 > 0, x), target(path, x_t, x_t2, t, t2),
                                              x_t2))
    kw = {"guidance": w} if den.guidance_input else {}
    pred = den.apply(params["student"], x_t, t, labels, cond, train=True,
                     rngs={"dropout": ctx.dropout_key}, **kw).astype(jnp.float32)
    x_hat = predictions.to_x0_eps(path, den.prediction, pred, x_t, t)[0]
    per_example = jnp.mean(jnp.square(x_hat - x_tilde).reshape(B, -1), axis=1)
    return jnp.mean(weight(config.progressive.weighting, path, t) * per_example), ({}, params)

  players = (Player(loss=loss, tx=tx, schedule=sched, name="student",
                    ema_decay=config.train.ema_decay,
                    mask=optim.trainable(config.optim.trainable)),)

  def init(key):
    _, teacher_net = distill.teacher(config)
    params = {"student": distill.init_params(config, base, key),
              "teacher": jax.tree.map(jnp.asarray, teacher_net)}
    return state_lib.init_state(players, params)

  generator, denoiser = distill.on_student(base)
  return Task(init=init, players=players, text=base.text, generator=generator,
              denoiser=denoiser)
