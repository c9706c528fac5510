"""The latent autoencoder task: the KL-regularised autoencoder of latent diffusion
(Rombach et al. 2022, §3 and Appendix G) trained with reconstruction, perceptual and
adversarial losses (Esser et al. 2021, Eq. 7) — two players of the generic step.

Players, in order each step:
  autoencoder    the encoder/decoder (`nets/autoencoder.py`, diffusers' AutoencoderKL
                 layout), loss `losses/autoencoder.py`:
                   L = L_rec + w_kl·KL + [step ≥ disc_start]·w_d·λ·L_adv,
                 λ the adaptive weight at the decoder's last layer; with an EMA
                 (config.train.ema_decay) — the generator EMA of the JAX VQGAN/MAGVIT
                 trainers;
  discriminator  a PatchGAN (config.gan: discriminator, patch_layers, channels, d_norm,
                 d_lr, loss, r1_weight) on real images and the autoencoder's
                 reconstructions, trained from step autoencoder.disc_start (before it
                 its parameters and optimizer state stay as initialised); absent when
                 autoencoder.disc_weight = 0.

State (the one TrainState, laid out per player):
    params     {"autoencoder": {"params"}, "discriminator": D's variables,
                "lpips": LPIPS variables (frozen, only with perceptual_weight > 0)}
    ema_params {"autoencoder": EMA of its "params"}

Randomness: z_j = μ_j + σ_j·N(fold_in(key_j, 0)) with key_j the example's key, the same
reconstruction in both players' losses, so 1 device, 8 devices and several hosts agree.

Capability: `autoencoder` (encode → the posterior's (μ, σ), decode → x̂), used by latent
diffusion (`config.latent.autoencoder=<this workdir>`), the latent cache
(`diffusion-jax-encode`) and evaluation's reconstruction metrics (psnr, ssim, lpips,
rfd). Latents are not scaled here (scale 1, shift 0): the latent cache measures the
scale that gives them unit variance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import nets
from diffusion_jax.losses import autoencoder as ae_losses, gan as gan_losses, vae as vae_losses
from diffusion_jax.nets import autoencoder as ae_nets, gan as gan_nets, lpips as lpips_lib
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks.base import Autoencoder, Player, Task
from diffusion_jax.training.tasks.gan import apply_train

_Z = 0  # fold-in constant of the posterior sample


def network(config, info) -> ae_nets.AutoencoderKL:
  """The autoencoder for the dataset's image channels (config.autoencoder)."""
  return ae_nets.from_config(config.autoencoder, info.image_shape[-1],
                             nets.dtype(config.model.dtype),
                             nets.dtype(config.model.param_dtype, "model.param_dtype"))


def latent_shape(config, info) -> tuple:
  """(H/f, W/f, latent_channels), f = 2^(len(autoencoder.channels) − 1)."""
  f = 2 ** (len(config.autoencoder.channels) - 1)
  H, W = info.image_shape[:2]
  return (H // f, W // f, config.autoencoder.latent_channels)


def _check(config, info):
  a, g = config.autoencoder, config.gan
  if not info.is_image:
    raise ValueError(f"config.task='autoencoder' needs an image dataset; "
                     f"{config.data.name!r} is {info.kind!r}")
  f = 2 ** (len(a.channels) - 1)
  H, W = info.image_shape[:2]
  if H % f or W % f:
    raise ValueError(f"config.autoencoder.channels={tuple(a.channels)} downsamples by "
                     f"f={f}, which must divide the image size {H}×{W} (set "
                     "config.data.image_size or fewer levels)")
  if a.perceptual_weight and not a.lpips_weights:
    raise ValueError("config.autoencoder.perceptual_weight > 0 needs "
                     "config.autoencoder.lpips_weights (an LPIPS .npz, docs/autoencoders.md)")
  if a.disc_weight and g.d_norm == "batch" and g.r1_weight:
    raise ValueError("config.gan.d_norm='batch' with config.gan.r1_weight: a gradient "
                     "penalty is per example, BatchNorm mixes the batch; use d_norm='none'")
  if config.optim.trainable:
    raise ValueError("config.optim.trainable: the autoencoder task trains both players whole")


def make(config, info) -> Task:
  """Batches: "image" [B,H,W,C]. Metrics: rec (Σ_pixels reconstruction incl. the
  perceptual term, mean over examples), kl, adv (the autoencoder's adversarial loss),
  adaptive_weight (λ), disc_active (0/1), d_real / d_fake (mean logits), r1, the players'
  losses, grad norms and lrs, nonfinite."""
  _check(config, info)
  a, g = config.autoencoder, config.gan
  ae = network(config, info)
  adversarial = bool(a.disc_weight)
  d_net = gan_nets.build_discriminator(config, tuple(info.image_shape), 0) if adversarial else None
  (tx, sched) = optim.make(config.optim, config.train.num_steps)
  d_cfg = config.optim.copy_and_resolve_references()
  if g.d_lr is not None:
    d_cfg.lr = g.d_lr
  tx_d, sched_d = optim.make(d_cfg, config.train.num_steps)
  pixels = 1
  for s in info.image_shape:
    pixels *= s

  def posterior(variables, x):
    mean, logvar = ae.apply(variables, x, method="encode")
    return mean, jnp.exp(0.5 * logvar), logvar

  def sample_z(mean, std, keys):
    eps = jax.vmap(lambda k, m: jax.random.normal(jax.random.fold_in(k, _Z), m.shape,
                                                  m.dtype))(keys, mean)
    return mean + std * eps

  def nll(params, x, x_hat):
    """L_rec per example [B] (reconstruction + perceptual, summed over pixels)."""
    rec = ae_losses.reconstruction(a.reconstruction, x, x_hat)
    if a.perceptual_weight:
      rec = rec + a.perceptual_weight * pixels * lpips_lib.lpips(params["lpips"], x, x_hat)
    return rec

  def ae_loss(params, batch, keys, ctx):
    x = batch["image"]
    variables = params["autoencoder"]
    mean, std, logvar = posterior(variables, x)
    z = sample_z(mean, std, keys)
    kl = jnp.mean(vae_losses.kl_standard_normal(mean, logvar))
    metrics = {}
    if not adversarial:
      x_hat = ae.apply(variables, z, method="decode")
      rec = jnp.mean(nll(params, x, x_hat))
      return rec + a.kl_weight * kl, (dict(rec=rec, kl=kl), params)

    path = ("params",) + tuple(ae_nets.LAST_LAYER)

    def with_last(w):
      return state_lib.put_in(variables, w, *path)

    def forward(w):
      x_hat = ae.apply(with_last(w), z, method="decode")
      logits, _ = apply_train(d_net, params["discriminator"], x_hat, None)
      return (jnp.mean(nll(params, x, x_hat)), gan_losses.generator_loss(g.loss, logits)), None

    (rec, adv), pullback, _ = jax.vjp(forward, state_lib.get_in(variables, *path),
                                          has_aux=True)
    if a.adaptive_weight:
      one, zero = jnp.ones((), rec.dtype), jnp.zeros((), rec.dtype)
      lam = ae_losses.adaptive_weight(pullback((one, zero))[0], pullback((zero, one))[0],
                                      max_weight=a.adaptive_max)
    else:
      lam = jnp.ones(())
    active = (ctx.step >= a.disc_start).astype(jnp.float32)
    loss = rec + a.kl_weight * kl + active * a.disc_weight * lam * adv
    metrics.update(rec=rec, kl=kl, adv=adv, adaptive_weight=lam, disc_active=active)
    return loss, (metrics, params)

  def d_loss(params, batch, keys, ctx):
    if ctx.axis_name is not None and "batch_stats" in params["discriminator"]:
      raise ValueError("the autoencoder task's BatchNorm discriminator runs under jit "
                       "(global-batch statistics); use train.parallel='jit' or "
                       "config.gan.d_norm='layer' / 'none'")
    x = batch["image"]
    mean, std, _ = posterior(params["autoencoder"], x)
    x_hat = jax.lax.stop_gradient(
        ae.apply(params["autoencoder"], sample_z(mean, std, keys), method="decode"))
    d_vars = params["discriminator"]
    real_logits, d_vars = apply_train(d_net, d_vars, x, None)
    fake_logits, d_vars = apply_train(d_net, d_vars, x_hat, None)
    loss = gan_losses.discriminator_loss(g.loss, real_logits, fake_logits)
    r1 = jnp.zeros(())
    if g.r1_weight:
      r1 = gan_losses.r1_penalty(lambda v: d_net.apply(d_vars, v, None, train=True), x)
      loss = loss + 0.5 * g.r1_weight * r1
    metrics = dict(d_real=jnp.mean(real_logits), d_fake=jnp.mean(fake_logits), r1=r1)
    return loss, (metrics, dict(params, discriminator=d_vars))

  players = [Player(loss=ae_loss, tx=tx, schedule=sched, name="autoencoder",
                    optimized="params", prefix="ae", ema_decay=config.train.ema_decay)]
  if adversarial:
    players.append(Player(loss=d_loss, tx=tx_d, schedule=sched_d, name="discriminator",
                          optimized="params", prefix="d", start=a.disc_start))
  players = tuple(players)

  def init(key):
    k_ae, k_d = jax.random.split(key)
    x = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
    params = {"autoencoder": dict(ae.init(k_ae, x))}
    if adversarial:
      params["discriminator"] = dict(d_net.init(k_d, x, None, train=False))
    if a.perceptual_weight:
      params["lpips"] = jax.tree.map(jnp.asarray, lpips_lib.load(a.lpips_weights))
    return state_lib.init_state(players, params)

  def encode(tree, x, labels=None):
    mean, std, _ = posterior(tree["autoencoder"], x)
    return mean, std

  def decode(tree, z, labels=None):
    return jnp.clip(ae.apply(tree["autoencoder"], z, method="decode"), -1.0, 1.0)

  autoencoder = Autoencoder(encode=encode, decode=decode, image_shape=tuple(info.image_shape),
                            latent_shape=latent_shape(config, info))
  return Task(init=init, players=players, autoencoder=autoencoder)

