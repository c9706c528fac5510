"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models"):
consistency distillation (CD, Algorithm 2) from a teacher run, and consistency training
(CT, Algorithm 3) without one, with the improvements of Song & Dhariwal 2023 ("Improved
Techniques for Training Consistency Models", iCT) as options.

The student is the diffusion network of the run's own config (`distill.student`), read
through the boundary parametrisation f_θ = c_skip·x_t + c_out·x̂₀_θ
(`diffusion.consistency`), so f_θ(x, t_min) = x exactly and a student initialised from
its teacher starts as the teacher's one-step denoiser. It samples through the diffusion
task's generator with that parametrisation applied to its denoiser (`samplers.consistency`,
CM Alg. 1: one step x̂₀ = f(x₁, 1), or several with re-noising).

The discretisation: N points t_min = t_1 < … < t_N = 1 (`grid`), EDM's ρ-spacing in σ = b/a
between σ_min (consistency.sigma_min; on a discrete path at least σ(1/T)) and σ_max,
mapped to times by `samplers.spacing.karras` (its top point pinned to t = 1, so the
sampler's t = 1 is a grid time; on the flow path σ(1) = ∞). t_min is the grid's lowest
time. N is consistency.num_scales, or grows with the step k: CM's N(k) or iCT's doubling
(`diffusion.consistency.num_scales`; every N the schedule can reach is a row of one table
built at trace time, so the step picks its row without recompiling).

A training example draws a pair n (uniform over the N − 1 pairs, or iCT's lognormal),
x_{t_{n+1}} = a·x + b·z, and

    CD: x̂_{t_n} = the teacher's one PF-ODE step t_{n+1} → t_n (Heun in σ, CM's choice, or
        Euler = DDIM; `diffusion.consistency.ode_step`) with the teacher's CFG weight w
        baked in (config.distill.guidance, else the teacher's sample.guidance; the
        student then samples with w = 0), as progressive distillation does;
    CT: x̂_{t_n} = a_n·x + b_n·z with the same z;

    loss = λ(t_n)·d(f_θ(x_{t_{n+1}}, t_{n+1}), f_θ⁻(x̂_{t_n}, t_n))     (`diffusion.consistency.loss`)

with d = l2 | l1 | pseudo_huber | lpips (LPIPS on 224×224 bilinear upsamplings, CM's) and
λ = 1 or iCT's 1/(σ_{n+1} − σ_n). The target network θ⁻: with μ = consistency.target_decay
> 0 (CM's 'cm' schedule: μ(k) = exp(s0·log μ₀/N(k))) it is params["target"], initialised
to θ and updated inside the loss as a non-gradient update θ⁻ ← μ·θ⁻ + (1 − μ)·θ, where θ
is the student as the loss sees it, i.e. BEFORE this step's optimizer update (CM Alg. 2
averages the updated θ: here θ⁻ lags by that one update); μ = 0 is θ⁻ = stopgrad(θ)
(iCT; CM's CIFAR-10 CD) and stores nothing. Student and target share the dropout key
(iCT §3.1). The student's EMA (config.train.ema_decay) is what samples by default.

State: params = {"student", "teacher" (CD; frozen), "target" (μ > 0), "lpips" (frozen,
distance='lpips')}, ema_params = {"student"}. CT without config.distill.teacher starts
from the diffusion task's random initialisation and never reads a teacher; with one it
starts from it (config.distill.init) and checks the config against it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import consistency as cm, paths, predictions
from diffusion_jax.nets import lpips as lpips_lib
from diffusion_jax.samplers import spacing as spacing_lib
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks import distill
from diffusion_jax.training.tasks.base import Player, Task

MODES = ("distillation", "training")
WEIGHTINGS = ("uniform", "ict")
TIME_SAMPLINGS = ("uniform", "lognormal")
_DEFAULT_S = {"cm": (2, 150), "ict": (10, 1280), "fixed": (0, 0)}
_N, _DROP = 0x7C01, 0x7C02  # fold-in salts: the grid pair, label dropout
LPIPS_SIZE = 224             # CM's LPIPS inputs: bilinear upsamplings to 224 × 224


def grid(path, n: int, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0):
  """(times float32 [n] ascending, t_min = t_1 < … < t_n = 1; their nominal σ float64 [n]):
  EDM's σ_i (Karras et al. 2022, eq. 5) between max(σ(t_0), σ_min) and min(σ(1), σ_max)
  mapped to times by `samplers.spacing.karras` (top pinned to t = 1, snapped on a discrete
  path). The nominal σ (the top one σ_max even where σ(1) = ∞) are what iCT's weighting
  and lognormal use."""
  t = np.asarray(spacing_lib.karras(path, n, rho=rho, sigma_min=sigma_min,
                                    sigma_max=sigma_max), np.float32)
  lo, hi = spacing_lib.sigma_range(path, sigma_min, sigma_max)
  return t[:n][::-1].copy(), spacing_lib.karras_sigmas(n, lo, hi, rho)[::-1].copy()


def schedule_settings(config):
  """(schedule, s0, s1, N of 'fixed') with the paper defaults of s0, s1 filled in."""
  c = config.consistency
  d0, d1 = _DEFAULT_S.get(c.schedule, (0, 0))
  return (c.schedule, d0 if c.s0 is None else int(c.s0), d1 if c.s1 is None else int(c.s1),
          int(c.num_scales))


@dataclasses.dataclass(frozen=True)
class Grids:
  """Every grid the schedule reaches, one row per N (`diffusion.consistency.scale_values`):
  times [R, N_max] (padded with the last point), iCT's weights 1/(σ_{n+1} − σ_n) of the
  pairs from the nominal σ in float64 [R, N_max − 1], log-probabilities of the pairs
  [R, N_max − 1] (−inf beyond a row's N − 1 pairs), and t_min (the same in every row)."""
  values: np.ndarray
  times: np.ndarray
  ict_weights: np.ndarray
  logp: np.ndarray
  t_min: float


def grids(config, path) -> Grids:
  c = config.consistency
  schedule, s0, s1, fixed = schedule_settings(config)
  values = cm.scale_values(schedule, s0, s1, fixed)
  n_max = int(values[-1])
  times = np.ones((len(values), n_max), np.float32)
  weights = np.ones((len(values), n_max - 1), np.float64)
  logp = np.full((len(values), n_max - 1), -np.inf, np.float64)
  for r, n in enumerate(values):
    t, s = grid(path, int(n), c.rho, c.sigma_min, c.sigma_max)
    times[r, :n], times[r, n:] = t, t[-1]
    weights[r, :n - 1] = cm.ict_weight(s[:-1], s[1:])
    p = (cm.lognormal_pair_probs(s, c.lognormal_mean, c.lognormal_std)
         if c.time_sampling == "lognormal" else np.full(n - 1, 1.0 / (n - 1)))
    with np.errstate(divide="ignore"):
      logp[r, :n - 1] = np.log(p)
  if not np.all(times[:, 0] == times[0, 0]):
    raise AssertionError("the grids' t_min differ between rows")
  return Grids(values=values, times=times, ict_weights=weights, logp=logp,
               t_min=float(times[0, 0]))


def _check(config, info, path):
  c, s = config.consistency, config.sample
  for key, choices in (("mode", MODES), ("schedule", cm.SCHEDULES), ("solver", cm.SOLVERS),
                       ("distance", cm.DISTANCES), ("weighting", WEIGHTINGS),
                       ("time_sampling", TIME_SAMPLINGS)):
    if c[key] not in choices:
      raise ValueError(f"config.consistency.{key}={c[key]!r}: expected one of {choices}")
  schedule, s0, s1, fixed = schedule_settings(config)
  if schedule == "fixed" and fixed < 2:
    raise ValueError(f"config.consistency.num_scales={fixed}: a grid needs >= 2 points")
  if schedule != "fixed" and not 2 <= s0 <= s1:
    raise ValueError(f"config.consistency.s0={s0}, config.consistency.s1={s1}: need "
                     "2 <= s0 <= s1")
  if path.discrete:
    n_max = fixed if schedule == "fixed" else s1 + 1
    if n_max > path.num_steps:
      key = "num_scales" if schedule == "fixed" else "s1"
      raise ValueError(f"config.consistency.{key}: a grid of {n_max} points exceeds the "
                       f"discrete path's {path.num_steps} steps (config.diffusion.num_steps)")
  if not 0.0 <= c.target_decay < 1.0:
    raise ValueError(f"config.consistency.target_decay={c.target_decay} must be in [0, 1)")
  if not 0.0 < c.sigma_min < c.sigma_max:
    raise ValueError(f"config.consistency.sigma_min={c.sigma_min} must be in "
                     f"(0, config.consistency.sigma_max={c.sigma_max})")
  if c.huber_c is not None and c.huber_c <= 0:
    raise ValueError(f"config.consistency.huber_c={c.huber_c} must be > 0 (None: iCT's)")
  if c.distance == "lpips":
    if not c.lpips_weights:
      raise ValueError("config.consistency.distance='lpips' needs "
                       "config.consistency.lpips_weights (an LPIPS .npz, nets/lpips.py)")
    if not info.is_image or info.image_shape[-1] not in (1, 3) or config.latent.autoencoder:
      raise ValueError("config.consistency.distance='lpips' compares pictures (1 or 3 "
                       "channels, pixel space); use pseudo_huber or l2 here")
  if s.sampler != "consistency":
    raise ValueError(f"a consistency model samples with config.sample.sampler="
                     f"'consistency' (is {s.sampler!r}; CM Alg. 1)")
  if c.mode == "training" and config.model.guidance_input:
    raise ValueError("config.model.guidance_input: consistency training has no teacher "
                     "whose guidance weight the network could take")


def _distance(config, info):
  """d(params, f, g) -> [B] (`diffusion.consistency.distance`; LPIPS on 224×224)."""
  c = config.consistency
  if c.distance != "lpips":
    d = cm.distance(c.distance, c.huber_c)
    return lambda params, f, g: d(f, g)

  def lpips(params, f, g):
    size = (f.shape[0], LPIPS_SIZE, LPIPS_SIZE, f.shape[-1])
    up = lambda v: jax.image.resize(v.astype(jnp.float32), size, "bilinear")
    return lpips_lib.lpips(params["lpips"], up(f), up(g))
  return lpips


def student_fn(den, path, t_min: float, sigma_data: float):
  """fn(net, labels [B], cond, w [B] | None, **network keywords) -> f(x_t, t [B]): the
  consistency function f_θ = c_skip·x_t + c_out·x̂₀_θ of the network parameters `net` of
  the Denoiser `den` (its prediction converted to x̂₀ exactly; `diffusion.consistency`);
  w goes to a guidance-input network."""
  def fn(net, labels, cond, w=None, **kw):
    gkw = {"guidance": w} if den.guidance_input else {}

    def f(x_t, t):
      pred = den.apply(net, x_t, t, labels, cond, **gkw, **kw).astype(jnp.float32)
      x0 = predictions.to_x0_eps(path, den.prediction, pred, x_t, t)[0]
      return cm.parametrize(path, x_t, x0, t, t_min, sigma_data)
    return f
  return fn


def make(config, info) -> Task:
  """Batches as the student's diffusion task. Metrics: loss, distance (the mean d before
  weighting), num_scales N(k), target_decay μ(k), the student's grad norm, lr."""
  c = config.consistency
  path = paths.from_config(config.diffusion)
  _check(config, info, path)
  g = grids(config, path)
  t_min, sigma_data = g.t_min, float(c.sigma_data)
  base = distill.student(config, info, denoiser_wrapper=lambda den: cm.boundary(
      den, path, t_min, sigma_data))
  den = base.denoiser
  distilling = c.mode == "distillation"
  schedule, s0, s1, fixed = schedule_settings(config)
  stored_target = c.target_decay > 0
  total = int(config.train.num_steps)
  x0_of = distill.draw(config, info)
  dist = _distance(config, info)
  tx, sched = optim.make(config.optim, total)
  values, times, ict_weights, logp = (
      jnp.asarray(g.values, jnp.int32), jnp.asarray(g.times),
      jnp.asarray(g.ict_weights, jnp.float32), jnp.asarray(g.logp, jnp.float32))

  consistency_fn = student_fn(den, path, t_min, sigma_data)

  def loss(params, batch, keys, ctx):
    x = x0_of(batch, keys)
    if distilling:
      teacher_den, w, labels, cond = distill.teacher_inputs(config, den, batch, keys, _DROP)
    else:  # CT: the student's own labels, dropped to ∅ as in training (keeps CFG)
      teacher_den, w = None, jnp.zeros(keys.shape[:1], jnp.float32)
      labels = distill.drop_labels(config, den, batch["label"].astype(jnp.int32), keys, _DROP)
      cond = distill.text_cond(batch)

    n_scales = cm.num_scales(schedule, ctx.step, total, s0, s1, fixed)
    row = jnp.searchsorted(values, n_scales)
    n = jax.vmap(lambda k: jax.random.categorical(jax.random.fold_in(k, _N), logp[row]))(keys)
    t_lo, t_hi = times[row, n], times[row, n + 1]
    weight = ict_weights[row, n] if c.weighting == "ict" else None
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), x.shape[1:]))(keys)

    drop_kw = dict(train=True, rngs={"dropout": ctx.dropout_key})  # shared (iCT §3.1)
    target_net = params["target"] if stored_target else params["student"]
    student = consistency_fn(params["student"], labels, cond, w, **drop_kw)
    target = consistency_fn(jax.lax.stop_gradient(target_net), labels, cond, w, **drop_kw)
    teacher = None
    if distilling:
      def teacher(x_t, t):
        pred = distill.cfg_prediction(teacher_den, params["teacher"], x_t, t, labels, cond, w)
        return predictions.to_x0_eps(path, teacher_den.prediction, pred.astype(jnp.float32),
                                     x_t, t)
    value, d = cm.loss(student, target, x, z, t_lo, t_hi, path, teacher=teacher,
                       solver=c.solver, distance=lambda f_, g_: dist(params, f_, g_),
                       weight=weight)
    mu = cm.target_decay(schedule, float(c.target_decay), n_scales, s0)
    if stored_target:  # θ⁻ ← μ·θ⁻ + (1 − μ)·θ, θ as before this step's update
      params = dict(params, target=jax.tree.map(
          lambda p, q: mu * p + (1.0 - mu) * jax.lax.stop_gradient(q),
          params["target"], params["student"]))
    metrics = {"distance": jnp.mean(d), "num_scales": n_scales.astype(jnp.float32),
               "target_decay": mu}
    return value, (metrics, params)

  players = (Player(loss=loss, tx=tx, schedule=sched, name="student",
                    ema_decay=config.train.ema_decay,
                    mask=optim.trainable(config.optim.trainable)),)

  def init(key):
    if distilling or config.distill.teacher:
      student_params = distill.init_params(config, base, key)
    else:  # CT from scratch: never reads a teacher
      student_params = base.init(key).params
    params = {"student": student_params}
    if distilling:
      params["teacher"] = jax.tree.map(jnp.asarray, distill.teacher(config)[1])
    if stored_target:
      params["target"] = jax.tree.map(jnp.copy, student_params)
    if c.distance == "lpips":
      params["lpips"] = jax.tree.map(jnp.asarray, lpips_lib.load(c.lpips_weights))
    return state_lib.init_state(players, params)

  generator, student_den = distill.on_student(base)
  return Task(init=init, players=players, text=base.text, generator=generator,
              denoiser=_as_denoiser(student_den, path, t_min, sigma_data))


def _as_denoiser(den, path, t_min, sigma_data):
  """The run's `Denoiser` capability: the consistency function f_θ as a prediction of the
  network's type (x̂₀ = f, ε̂ = (x_t − a·f)/b), so a run that reads this one as a teacher
  or a denoiser sees f_θ, not the raw network inside it."""
  def apply(net, x_t, t, labels, cond, **kw):
    pred = den.apply(net, x_t, t, labels, cond, **kw).astype(jnp.float32)
    x0 = predictions.to_x0_eps(path, den.prediction, pred, x_t, t)[0]
    f = cm.parametrize(path, x_t, x0, t, t_min, sigma_data)
    a, b = (v.reshape(v.shape + (1,) * (x_t.ndim - 1)) for v in path.ab(t))
    eps = (x_t - a * f) / jnp.where(b > 0, b, 1.0)
    return predictions.target(path, den.prediction, f, eps, t)
  return dataclasses.replace(den, apply=apply)
