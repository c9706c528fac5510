"""Adversarial diffusion distillation (Sauer, Lorenz, Blattmann, Rombach 2024,
"Adversarial Diffusion Distillation", §3): a few-step student trained with a
distillation loss against a frozen teacher plus an adversarial loss from a
discriminator — two players of the generic step.

Student times (ADD §3.2, "T_student"): the K = config.sample.num_steps times of the
student's own sampling grid, τ_k = t_k of `samplers.spacing.grid` (config.sample.times,
else config.sample.spacing, default uniform) for k = 0 … K − 1; K = 4 uniform gives
τ ∈ {1, 0.75, 0.5, 0.25}, ADD's {1000, 750, 500, 250} of 1000 steps. A training example draws k ~ U{0, …, K − 1},
x_s = a_s·x₀ + b_s·ε at s = τ_k, and the student's x̂_θ = x̂₀(student(x_s, s)) (any
prediction type, converted exactly by `diffusion.predictions.to_x0_eps`).

Distillation loss (ADD eq. 4): x̂_θ is re-noised to a teacher time t,
x̂_{θ,t} = a_t·sg(x̂_θ) + b_t·ε′, t ~ U[t_min, t_max] (config.adversarial.teacher_t_min /
teacher_t_max, continuous; snapped to i/T on a discrete path, at least 1/T — our choice
of the paper's teacher timesteps), the teacher denoises it under classifier-free guidance
w (`distill.cfg_prediction`; w = `distill.teacher_guidance`, baked into the student,
which samples with w = 0), and

    L_distill = E c(t)·‖x̂_θ − sg(x̂_ψ(x̂_{θ,t}, t))‖²     (mean over the dimensions)

with c(t) = a_t (config.adversarial.distill_weighting='a_t', ADD's "exponential"
weighting: noisier targets count less) or 1 ('uniform'). A guidance-distilled (w-input)
teacher and its student both get w ~ U[w_min, w_max] (config.guidance_distillation;
`distill.guidance_weights`).

Adversarial loss (ADD §3.2): a discriminator of config.gan (`nets/gan.py`:
`gan.discriminator` dcgan / mlp with the projection of the class label when
`model.class_conditional`, or an unconditional patchgan) on x̂_θ and on real data,
`gan.loss` (ADD: hinge, `losses/gan.py`) and the R1 penalty γ/2·E‖∇D(x₀)‖² on real data
(`gan.r1_weight`, Mescheder et al. 2018). ADD's discriminator is a frozen DINOv2 ViT with
trainable heads on decoded images; here it is a small trainable network on the space the
student denoises: pixels, or a latent space's scaled latents (not decoded).

Players, in order each step (Goodfellow et al. 2014, Alg. 1; `gan.py`'s layout):
  discriminator  `gan.d_steps` updates on interleaved slices of the batch, its own
                 optimizer at `gan.d_lr` (`gan.optimizers`), no EMA; absent when
                 config.adversarial.adversarial_weight = 0;
  student        L = w_adv·L_adv^G + λ·L_distill (w_adv = adversarial.adversarial_weight,
                 λ = adversarial.distill_weight, ADD: 2.5), with an EMA
                 (config.train.ema_decay).

State: params {"student", "teacher" (frozen), "discriminator" (flax variables)},
ema_params {"student"}, opt_state {"student", "discriminator"}.

Randomness per example (key_j = the step's fold_in(key, j)): the student step k and the
noise ε of x_s from key_j (salts `_K`, 0), the teacher time and ε′ (`_T`, `_EPS2`). The
discriminator's update u of `gan.d_steps` sees the examples j ≡ u (mod d_steps) and the
same x_s of them as the student's loss (the student's parameters before its update).

The student samples with config.sample.sampler 'consistency' (`samplers.consistency`,
Song et al. 2023 Alg. 1: x̂₀ = student(x, τ_k), x = a(τ_{k+1})·x̂₀ + b(τ_{k+1})·z: fresh
noise, what ADD samples with) or 'ddim' over the same grid, with 1 … K steps (a uniform
grid of K′ | K steps queries only student times).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import paths, predictions
from diffusion_jax.losses import gan as gan_losses
from diffusion_jax.nets import gan as gan_nets
from diffusion_jax.samplers import spacing as spacing_lib
from diffusion_jax.training import state as state_lib
from diffusion_jax.training.tasks import distill, gan as gan_task, latent as latent_lib
from diffusion_jax.training.tasks.base import Player, Task

WEIGHTINGS = ("a_t", "uniform")
SAMPLERS = ("consistency", "ddim")
_K, _T, _EPS2 = 0xADD1, 0xADD2, 0xADD3  # fold-in salts: student step, teacher time, ε′


def _b(v, x):
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def student_times(config, path):
  """τ_0 > … > τ_{K−1} [K]: the first K times of the student's K-step sampling grid
  (config.sample.times when set, else config.sample.spacing, default uniform; as the
  sampler's, `diffusion.sampler_options`)."""
  s = config.sample
  k = int(s.num_steps)
  times = s.get("times")
  spacing = tuple(float(t) for t in times) if times is not None else s.spacing or "uniform"
  return spacing_lib.grid(path, k, spacing)[:k]


def teacher_times(config, path, keys):
  """t [B] ~ U[t_min, t_max] from fold_in(key_j, _T); on a discrete path snapped to i/T
  with i ≥ 1."""
  a = config.adversarial
  u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _T)))(keys)
  t = a.teacher_t_min + (a.teacher_t_max - a.teacher_t_min) * u
  if path.discrete:
    t = jnp.maximum(path.snap(t), 1.0 / path.num_steps)
  return t


def weight(kind: str, path, t):
  """c(t) [B] of the distillation loss: a_t ('a_t') or 1 ('uniform')."""
  if kind == "uniform":
    return jnp.ones_like(t)
  if kind == "a_t":
    return path.ab(t)[0]
  raise ValueError(f"config.adversarial.distill_weighting={kind!r}: expected one of "
                   f"{WEIGHTINGS}")


def noised(path, x0, t, keys, salt):
  """a_t·x₀ + b_t·ε, ε = N(fold_in(key_j, salt)) per example; t [B]."""
  eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), x0.shape[1:]))(keys)
  a, b = path.ab(t)
  return _b(a, x0) * x0 + _b(b, x0) * eps


def student_x0(den, path, taus, net, x0, labels, cond, keys, w, **kw):
  """(x̂_θ [B, ...], s [B]): the student's x̂₀ at a random student time s = τ_k
  (k ~ U{0..K−1} from fold_in(key_j, _K)) on x_s = a_s·x₀ + b_s·ε (ε from fold_in(key_j, 0))."""
  k = jax.vmap(lambda key: jax.random.randint(jax.random.fold_in(key, _K), (), 0,
                                              taus.shape[0]))(keys)
  s = taus[k]
  x_s = noised(path, x0, s, keys, 0)
  if den.guidance_input:
    kw = dict(kw, guidance=w)
  pred = den.apply(net, x_s, s, labels, cond, **kw).astype(jnp.float32)
  return predictions.to_x0_eps(path, den.prediction, pred, x_s, s)[0], s


def distillation_target(config, teacher_den, teacher_net, path, x_hat, labels, cond, keys, w):
  """(x̂_ψ [B, ...], t [B]): the teacher's x̂₀ (CFG w, `distill.cfg_prediction`) on the
  re-noised student output x̂_{θ,t} = a_t·x̂_θ + b_t·ε′ (ADD eq. 4), ε′ from
  fold_in(key_j, _EPS2); both stop-gradient."""
  t = teacher_times(config, path, keys)
  x_t = jax.lax.stop_gradient(noised(path, x_hat, t, keys, _EPS2))
  pred = distill.cfg_prediction(teacher_den, teacher_net, x_t, t, labels, cond, w)
  x_psi = predictions.to_x0_eps(path, teacher_den.prediction, pred.astype(jnp.float32),
                                x_t, t)[0]
  return jax.lax.stop_gradient(x_psi), t


def _check(config):
  a, g, s = config.adversarial, config.gan, config.sample
  if a.distill_weighting not in WEIGHTINGS:
    raise ValueError(f"config.adversarial.distill_weighting={a.distill_weighting!r}: "
                     f"expected one of {WEIGHTINGS}")
  for key in ("distill_weight", "adversarial_weight"):
    if a[key] < 0:
      raise ValueError(f"config.adversarial.{key}={a[key]} must be >= 0")
  if not (a.distill_weight or a.adversarial_weight):
    raise ValueError("config.adversarial.distill_weight and config.adversarial."
                     "adversarial_weight are both 0: the student would have no loss")
  if not 0.0 <= a.teacher_t_min < a.teacher_t_max <= 1.0:
    raise ValueError(f"config.adversarial.teacher_t_min={a.teacher_t_min}, teacher_t_max="
                     f"{a.teacher_t_max}: need 0 <= teacher_t_min < teacher_t_max <= 1")
  if s.sampler not in SAMPLERS:
    raise ValueError(f"config.sample.sampler={s.sampler!r}: an adversarial-distillation "
                     f"student samples on its grid of student times with one of {SAMPLERS} "
                     "(consistency: re-noising with fresh noise, as ADD)")
  if not config.model.guidance_input and s.guidance != 0:
    raise ValueError(f"config.sample.guidance={s.guidance}: an adversarial-distillation "
                     "student samples without classifier-free guidance (the teacher's CFG "
                     "weight, config.distill.guidance, is baked into it); set "
                     "config.sample.guidance=0")
  if a.adversarial_weight:
    if g.d_norm == "batch" and g.r1_weight:
      raise ValueError("config.gan.d_norm='batch' with config.gan.r1_weight: a gradient "
                       "penalty is per example, BatchNorm mixes the batch; use "
                       "d_norm='layer' or 'none'")
    if config.data.batch_size % g.d_steps:
      raise ValueError(f"config.data.batch_size={config.data.batch_size} must divide by "
                       f"config.gan.d_steps={g.d_steps} (one slice of the batch per update)")
  if config.optim.trainable:
    raise ValueError("config.optim.trainable: the adversarial_distillation task trains the "
                     "student and the discriminator whole")


def make(config, info) -> Task:
  """Batches as the teacher's. Metrics: distill (L_distill), adv (the student's L_adv),
  student_loss, d_loss, d_real / d_fake (mean discriminator logits on real data and on
  x̂_θ), r1, grad norms and lrs, nonfinite."""
  _check(config)
  base = distill.student(config, info)
  den = base.denoiser
  path = paths.from_config(config.diffusion)
  taus = student_times(config, path)
  x0_of = distill.draw(config, info)
  a, g = config.adversarial, config.gan
  adversarial = bool(a.adversarial_weight)
  space = latent_lib.space(config, info)
  ncls = (space.latent_info if space else info).num_classes
  d_net = gan_nets.build_discriminator(config, den.shape, ncls) if adversarial else None
  (tx, sched), (tx_d, sched_d) = gan_task.optimizers(config)

  def inputs(batch, keys):
    """(teacher Denoiser, x₀, labels, text cond, w) of a slice of the batch."""
    teacher_den, _ = distill.teacher(config)
    distill.check_teacher(den, teacher_den)
    w = distill.guidance_weights(config, teacher_den, keys)
    return (teacher_den, x0_of(batch, keys), batch["label"].astype(jnp.int32),
            distill.text_cond(batch), w)

  def student_loss(params, batch, keys, ctx):
    teacher_den, x0, labels, cond, w = inputs(batch, keys)
    x_hat, _ = student_x0(den, path, taus, params["student"], x0, labels, cond, keys, w,
                          train=True, rngs={"dropout": ctx.dropout_key})
    target, t = distillation_target(config, teacher_den, params["teacher"], path, x_hat,
                                    labels, cond, keys, w)
    per_example = jnp.mean(jnp.square(x_hat - target).reshape(x_hat.shape[0], -1), axis=1)
    l_distill = jnp.mean(weight(a.distill_weighting, path, t) * per_example)
    loss, metrics = a.distill_weight * l_distill, {"distill": l_distill}
    if adversarial:
      # D in training mode; its running statistics (d_norm='batch') are not updated here.
      logits, _ = gan_task.apply_train(d_net, params["discriminator"], x_hat, labels)
      l_adv = gan_losses.generator_loss(g.loss, logits)
      loss = loss + a.adversarial_weight * l_adv
      metrics["adv"] = l_adv
    return loss, (metrics, params)

  def d_loss(params, batch, keys, ctx):
    if ctx.axis_name is not None and "batch_stats" in params["discriminator"]:
      raise ValueError("a BatchNorm discriminator (config.gan.d_norm='batch') runs under "
                       "jit (global-batch statistics); use train.parallel='jit' or "
                       "config.gan.d_norm='layer' / 'none'")
    teacher_den, real, labels, cond, w = inputs(batch, keys)
    fake, _ = student_x0(den, path, taus, params["student"], real, labels, cond, keys, w)
    fake = jax.lax.stop_gradient(fake)
    d_vars = params["discriminator"]
    real_logits, d_vars = gan_task.apply_train(d_net, d_vars, real, labels)
    fake_logits, d_vars = gan_task.apply_train(d_net, d_vars, fake, labels)
    loss = gan_losses.discriminator_loss(g.loss, real_logits, fake_logits)
    r1 = jnp.zeros(())
    if g.r1_weight:
      r1 = gan_losses.r1_penalty(lambda v: d_net.apply(d_vars, v, labels, train=True), real)
      loss = loss + 0.5 * g.r1_weight * r1
    metrics = dict(d_real=jnp.mean(real_logits), d_fake=jnp.mean(fake_logits), r1=r1)
    return loss, (metrics, dict(params, discriminator=d_vars))

  players = (Player(loss=student_loss, tx=tx, schedule=sched, name="student",
                    prefix="student", ema_decay=config.train.ema_decay),)
  if adversarial:
    players = (Player(loss=d_loss, tx=tx_d, schedule=sched_d, name="discriminator",
                      optimized="params", updates=g.d_steps, prefix="d"),) + players

  def init(key):
    k_student, k_d = jax.random.split(key)
    _, teacher_net = distill.teacher(config)
    params = {"student": distill.init_params(config, base, k_student),
              "teacher": jax.tree.map(jnp.asarray, teacher_net)}
    if adversarial:
      x = jnp.zeros((1,) + tuple(den.shape), jnp.float32)
      params["discriminator"] = dict(d_net.init(k_d, x, jnp.zeros((1,), jnp.int32),
                                                train=False))
    return state_lib.init_state(players, params)

  generator, denoiser = distill.on_student(base)
  return Task(init=init, players=players, text=base.text, generator=generator,
              denoiser=denoiser)
