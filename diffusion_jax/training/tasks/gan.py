"""The GAN task: a generator and a discriminator trained as a two-player game.

One compiled step does `config.gan.d_steps` = k discriminator updates, then one
generator update (Goodfellow et al. 2014, Algorithm 1), with the loss of
`config.gan.loss` (`losses/gan.py`) and optional WGAN-GP / R1 penalties.

Two players of the generic step (`training/step.py`): the discriminator (k updates
on interleaved slices of the batch, no EMA) then the generator (one update, with an
EMA). State: the one `TrainState` pytree of every task, laid out for two players:

    params     {"generator": G's variables, "discriminator": D's variables}
    ema_params {"generator": EMA of G's "params", with G's current "batch_stats"}
    opt_state  {"generator": optax state of G, "discriminator": optax state of D}

where a network's *variables* are its flax collections ({"params"} and, with
BatchNorm, {"batch_stats"}); only "params" are optimised. Sampling takes either tree
(`sample_fn(state.ema_params | state.params, ...)` reads ["generator"]), so the loop,
checkpoints, sharding and `diffusion-jax-sample` treat a GAN like any other run.

Batches and randomness: the global batch of B real examples is split into k
interleaved slices (example j goes to discriminator update j mod k, so every device
keeps its own examples); update i draws z_j = N(fold_in(key_j, i)) for its slice; the
generator update draws B fresh z_j = N(fold_in(key_j, k)) with the batch's labels.
key_j = fold_in(step key, global index j), so 1 device, 8 devices and several hosts
compute the same step. BatchNorm normalises over the global batch under jit (XLA
reduces across devices), so its statistics are the global batch's at any device
count. The discriminator sees real and generated batches in separate calls (separate
batch statistics, as DCGAN's reference code does); G's running statistics are updated
by the generator update only.

Conditional GANs (`model.class_conditional`): the generator gets the labels of the
real examples (conditional BatchNorm / embedding); the discriminator the same labels
(projection).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.losses import gan as gan_losses
from diffusion_jax.nets import gan as gan_nets
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks.base import Generator, Player, Task, class_grid_labels, refuse

_Z, _EPS, _NOISE = 0, 1, 2  # fold-in constants: latent z, GP interpolation ε, G's noise


def networks(config, info):
  """(generator, discriminator) for the dataset's image shape (nets/gan.py)."""
  shape = tuple(info.image_shape)
  return (gan_nets.build_generator(config, shape, info.num_classes),
          gan_nets.build_discriminator(config, shape, info.num_classes))


def optimizers(config):
  """((tx_g, schedule_g), (tx_d, schedule_d)): config.optim for both, the
  discriminator's learning rate gan.d_lr when set (two time-scale updates), its
  schedule over its num_steps × d_steps updates."""
  num_steps = config.train.num_steps
  d_cfg = config.optim.copy_and_resolve_references()
  if config.gan.d_lr is not None:
    d_cfg.lr = config.gan.d_lr
  return (optim.make(config.optim, num_steps),
          optim.make(d_cfg, num_steps * config.gan.d_steps))


def latents(config, keys, salt: int):
  """z_i ~ N(0, I) [N, latent_dim] from fold_in(keys[i], salt)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt),
                                              (config.gan.latent_dim,)))(keys)


def _noise_keys(keys, salt: int):
  return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, _NOISE), salt))(keys)


def apply_train(net, variables, *args, **kw):
  """net in training mode → (output, variables with updated BatchNorm statistics)."""
  out, updates = net.apply(variables, *args, train=True, mutable=["batch_stats"], **kw)
  return out, dict(variables, **updates)


def _check(config):
  g, k = config.gan, config.gan.d_steps
  if g.d_norm == "batch" and (g.gp_weight or g.r1_weight):
    raise ValueError("config.gan.d_norm='batch' with config.gan.gp_weight / r1_weight: a "
                     "gradient penalty is per example, BatchNorm mixes the batch; use "
                     "d_norm='layer' or 'none'")
  if config.data.batch_size % k:
    raise ValueError(f"config.data.batch_size={config.data.batch_size} must divide by "
                     f"config.gan.d_steps={k} (one slice of the batch per update)")
  if config.optim.trainable:
    raise ValueError("config.optim.trainable: the gan task trains both players whole")


def make(config, info) -> Task:
  """Batches: "image" [B,H,W,C], "label" [B]. Metrics: d_loss, g_loss (each with its
  penalties), loss = d_loss + g_loss, d_real / d_fake (mean D(x) = σ(l(x)) on real and
  generated data of the last discriminator update; for wgan the mean logit), gp, r1,
  grad norms, lr (the generator's), nonfinite. Capability: `generator` (one pass of
  the EMA or raw generator; latent interpolation strips)."""
  _check(config)
  g_net, d_net = networks(config, info)
  (tx_g, sched_g), (tx_d, sched_d) = optimizers(config)
  gc, k = config.gan, config.gan.d_steps
  kind = gc.loss
  prob = (lambda l: jnp.mean(l)) if kind == "wgan" else (lambda l: jnp.mean(jax.nn.sigmoid(l)))

  def fake_batch(g_vars, keys, labels, salt):
    z = latents(config, keys, salt)
    return apply_train(g_net, g_vars, z, labels, keys=_noise_keys(keys, salt))

  def d_loss(params, batch, keys, ctx):
    if ctx.axis_name is not None and any("batch_stats" in v for v in params.values()):
      raise ValueError("the gan task with BatchNorm runs under jit (global-batch "
                       "statistics); under pmap each device would normalise by its own "
                       "slice. Use the jit path, or config.gan.d_norm / generator without it")
    real, labels, i = batch["image"], batch["label"].astype(jnp.int32), ctx.update
    fake, _ = fake_batch(params["generator"], keys, labels, i)  # G's stats: unchanged
    fake = jax.lax.stop_gradient(fake)
    d_vars = params["discriminator"]
    real_logits, d_vars = apply_train(d_net, d_vars, real, labels)
    fake_logits, d_vars = apply_train(d_net, d_vars, fake, labels)
    loss = gan_losses.discriminator_loss(kind, real_logits, fake_logits)
    logits = lambda x: d_net.apply(d_vars, x, labels, train=True)
    gp = r1 = jnp.zeros(())
    if gc.gp_weight:
      eps = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _EPS + i)))(keys)
      gp = gan_losses.gradient_penalty(logits, real, fake, eps)
    if gc.r1_weight:
      r1 = gan_losses.r1_penalty(logits, real)
    loss = loss + gc.gp_weight * gp + 0.5 * gc.r1_weight * r1
    metrics = dict(d_real=prob(real_logits), d_fake=prob(fake_logits), gp=gp, r1=r1)
    return loss, (metrics, dict(params, discriminator=d_vars))

  def g_loss(params, batch, keys, ctx):
    labels = batch["label"].astype(jnp.int32)
    fake, g_vars = fake_batch(params["generator"], keys, labels, k)
    # D in training mode (batch statistics of this batch, as in the D updates); its
    # running statistics are not updated by the generator's pass.
    logits, _ = apply_train(d_net, params["discriminator"], fake, labels)
    return gan_losses.generator_loss(kind, logits), ({}, dict(params, generator=g_vars))

  players = (
      Player(loss=d_loss, tx=tx_d, schedule=sched_d, name="discriminator",
             optimized="params", updates=k, prefix="d"),
      Player(loss=g_loss, tx=tx_g, schedule=sched_g, name="generator", optimized="params",
             prefix="g", ema_decay=config.train.ema_decay))

  def init(key):
    kg, kd = jax.random.split(key)
    labels = jnp.zeros((1,), jnp.int32)
    z = jnp.zeros((1, config.gan.latent_dim), jnp.float32)
    g_vars = g_net.init(kg, z, labels, keys=jax.random.split(kg, 1), train=False)
    d_vars = d_net.init(kd, jnp.zeros((1,) + tuple(info.image_shape), jnp.float32), labels,
                        train=False)
    return state_lib.init_state(players, {"generator": dict(g_vars),
                                         "discriminator": dict(d_vars)})

  g = generator_fn(config, info)

  def sample(*, sampler=None, num_steps=None, guidance=None, strength=1.0, classifier=None):
    """sample_fn(tree, cond, keys [N]) -> (x [N,H,W,C], 1): one generator pass with
    z_i = N(fold_in(keys[i], 0)) and labels cond["label"]. A GAN has no sampler, steps,
    guidance, SDEdit strength or classifier guidance: asking for any of them (a value
    other than config.sample's, which evaluation passes through) is an error."""
    s = config.sample
    refuse("a config.task='gan' run generates in one pass",
           sampler=sampler not in (None, s.sampler), steps=num_steps not in (None, s.num_steps),
           guidance=guidance not in (None, s.guidance), strength=strength != 1.0,
           **{"classifier guidance": classifier is not None})

    def sample_fn(tree, cond, keys):
      return g(tree, latents(config, keys, _Z), cond["label"], _noise_keys(keys, _Z)), 1
    return sample_fn

  def conditioning(labels, *, prompts=None, images=None, mask=None):
    refuse("a config.task='gan' run takes no inputs", prompts=prompts is not None,
           **{"input images": images is not None, "inpainting": mask is not None})
    return {"label": np.asarray(labels, np.int32)}

  ncls = info.num_classes if config.model.class_conditional else 0
  generator = Generator(
      sample=sample, conditioning=conditioning, num_classes=ncls, options=(),
      pictures=info.is_image,
      grid=lambda: ({"label": class_grid_labels(ncls, config.sample.per_class)}, ncls or 8),
      interpolate=lambda tree, key, labels, num_points, method="linear": interpolate(
          config, info, tree, key, labels, num_points, method))
  return Task(init=init, players=players, generator=generator)


def generator_fn(config, info):
  """G(tree, z [N, latent_dim], labels [N], keys [N] | None) -> x [N,H,W,C] in
  inference mode (running BatchNorm statistics); tree: state.params or
  state.ema_params. keys give StyleGAN's per-example noise (None: no noise)."""
  g_net, _ = networks(config, info)

  def g(tree, z, labels, keys=None):
    return g_net.apply(tree["generator"], z, labels, keys=keys, train=False)
  return g


def slerp(z0, z1, s):
  """Spherical interpolation of z0, z1 [..., D] at s ∈ [0, 1] (Shoemake 1985; White
  2016 for GAN latents): sin((1−s)Ω)/sin Ω · z0 + sin(sΩ)/sin Ω · z1, Ω the angle
  between them (linear where they are parallel)."""
  n0, n1 = jnp.linalg.norm(z0, axis=-1, keepdims=True), jnp.linalg.norm(z1, axis=-1, keepdims=True)
  cos = jnp.clip(jnp.sum(z0 * z1, -1, keepdims=True) / (n0 * n1), -1.0, 1.0)
  omega = jnp.arccos(cos)
  so = jnp.sin(omega)
  safe = so > 1e-6
  w0 = jnp.where(safe, jnp.sin((1 - s) * omega) / jnp.where(safe, so, 1.0), 1 - s)
  w1 = jnp.where(safe, jnp.sin(s * omega) / jnp.where(safe, so, 1.0), s)
  return w0 * z0 + w1 * z1


def interpolate(config, info, tree, key, labels, num_points: int, method: str = "linear"):
  """Latent interpolation strips: for each label (row r), z0 = N(fold_in(key, 2r)) and
  z1 = N(fold_in(key, 2r + 1)), the generator at num_points evenly spaced points from z0
  to z1 ("linear": (1 − s)z0 + s·z1; "slerp") → x [R, num_points,
  H, W, C] (no noise injection)."""
  if method not in ("linear", "slerp"):
    raise ValueError(f"interpolation {method!r}: expected linear | slerp")
  labels = jnp.asarray(labels, jnp.int32)
  rows = labels.shape[0]
  idx = jnp.arange(2 * rows)
  z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                           (config.gan.latent_dim,)))(idx)
  z0, z1 = z[0::2, None], z[1::2, None]
  s = jnp.linspace(0.0, 1.0, num_points)[None, :, None]
  zs = (1 - s) * z0 + s * z1 if method == "linear" else slerp(z0, z1, s)
  g = generator_fn(config, info)
  x = g(tree, zs.reshape(rows * num_points, -1), jnp.repeat(labels, num_points))
  return x.reshape((rows, num_points) + x.shape[1:])
