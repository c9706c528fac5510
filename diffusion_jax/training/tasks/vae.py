"""The VAE task: a variational autoencoder as a generative model (Kingma & Welling 2014;
Rezende et al. 2014), trained by the β-weighted ELBO, with the importance-weighted bound
for evaluation (Burda et al. 2016).

One player of the generic step (`training/step.py`) over params = {"encoder": ...,
"decoder": ...} (flax "params" collections), with an EMA (config.train.ema_decay) and
`config.optim.trainable`. Its loss per example, averaged over the batch:

    −log p_θ(x | z) + β·KL(q_φ(z | x) ‖ N(0, I)),   z = μ_φ(x) + σ_φ(x) ⊙ ε

(K&W 2014, eq. 10, one sample; β: Higgins et al. 2017), the losses of `losses/vae.py`
and the networks of `nets/vae.py`. Metrics: elbo (the β = 1 bound, nats per example),
kl, rec (−log p(x | z) of the one sample, nats).

The data x each likelihood (config.vae.likelihood) models, and what `Bound.log_bounds`
bounds:
  gaussian, gaussian_learned  a density of x on R^D: N(x; μ(z), σ²) with σ = vae.sigma
      or a per-pixel σ(z). On image data training uses uniformly dequantised pixels
      x̃ = 2(n + u)/256 − 1 (`diffusion.likelihood.dequantize`'s convention; without it a
      learned σ collapses on constant pixels and the density is unbounded). The bound is
      of log p(x̃) for the x̃ it is given (discrete=False: evaluation dequantises).
  logistic  the 8-bit pixels n themselves: each a discretised logistic mass over the 256
      values (Salimans et al. 2017); the bound is of log P(n) (discrete=True).
  bernoulli with vae.binarize  binary images b ~ Bernoulli((x + 1)/2), drawn afresh each
      step (dynamic binarisation); the bound binarises its x with the given keys and is
      of log P(b), a mass over {0, 1}^D (discrete=True; bits per binary pixel, the
      binarised-MNIST convention of Burda et al. 2016, not comparable to 8-bit bits/dim).
  bernoulli without binarize  the cross-entropy against grayscale targets (x + 1)/2, a
      common training objective that is no likelihood of grayscale images: the task has
      no `bound`.

Randomness: key_j = fold_in(step key, global index j) per example (the generic step);
the latent, dequantisation and binarisation noise are fold_in(key_j, salt), so 1 device,
8 devices and several hosts compute the same step. Sampling: prior samples z_i =
N(fold_in(keys[i], 0)) decoded to the decoder's mean; with input images, their
reconstructions (the decoder's mean at the posterior mean).

Capabilities: `generator`, `autoencoder` (encode → (mean, std), decode → the decoder's
mean) and `bound` (ELBO and IWAE of each example).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.losses import vae as vae_losses
from diffusion_jax.nets import vae as vae_nets
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks import gan as gan_task
from diffusion_jax.training.tasks.base import (Autoencoder, Bound, Generator, Player, Task,
                                               class_grid_labels, refuse)

__all__ = ["make", "networks"]

# fold-in constants of a per-example key: the latent, dequantisation, binarisation, the
# importance samples of the bounds
_Z, _DEQUANT, _BINARIZE, _IW = 0, 1, 2, 3


def networks(config, info):
  """(encoder, decoder) for the dataset's image shape (nets/vae.py)."""
  return vae_nets.build(config, tuple(info.image_shape), info.num_classes)


def _check(config, info):
  v = config.vae
  if info.kind not in ("image", "values"):
    raise ValueError(f"config.task='vae' models pictures or float arrays; config.data.name="
                     f"{config.data.name!r} holds {info.kind!r} (a latent cache is the "
                     "diffusion task's input)")
  if v.binarize and v.likelihood != "bernoulli":
    raise ValueError(f"config.vae.binarize=True needs config.vae.likelihood='bernoulli' "
                     f"(got {v.likelihood!r}): only a Bernoulli decoder models binary pixels")
  if v.likelihood in ("bernoulli", "logistic") and info.kind != "image":
    raise ValueError(f"config.vae.likelihood={v.likelihood!r} models 8-bit pixels in "
                     f"[-1, 1], but config.data.name={config.data.name!r} holds "
                     f"{info.kind!r} data (float arrays): use config.vae.likelihood="
                     "'gaussian' or 'gaussian_learned'")
  if not v.sigma > 0:
    raise ValueError(f"config.vae.sigma={v.sigma!r} must be > 0")


def _labels(labels, n: int):
  return jnp.zeros((n,), jnp.int32) if labels is None else jnp.asarray(labels, jnp.int32)


def make(config, info) -> Task:
  """Batches: "image" [B,H,W,C] in [-1, 1], "label" [B]. Metrics: elbo, kl, rec, loss,
  grad_norm, lr, nonfinite. Capabilities: `generator` (prior samples, reconstructions,
  latent interpolation strips), `autoencoder`, `bound` (not for an unbinarised
  Bernoulli decoder; see the module docstring)."""
  _check(config, info)
  enc, dec = networks(config, info)
  tx, sched = optim.make(config.optim, config.train.num_steps)
  v, shape = config.vae, tuple(info.image_shape)
  kind, image = v.likelihood, info.kind == "image"
  ncls = info.num_classes if config.model.class_conditional else 0

  def encode_raw(tree, x, labels):
    """(mean, logvar) [B, latent_dim] of q(z | x)."""
    return enc.apply({"params": tree["encoder"]}, x, _labels(labels, x.shape[0]))

  def decode_raw(tree, z, labels):
    """The likelihood's parameters (loc, log_scale | None) [B, H, W, C]."""
    return dec.apply({"params": tree["decoder"]}, z, _labels(labels, z.shape[0]))

  def log_px_z(x, loc, log_scale):
    """log p(x | z) [B] of the data x the likelihood models (module docstring)."""
    if kind == "gaussian":
      return vae_losses.gaussian_log_prob(x, loc, jnp.log(v.sigma))
    if kind == "gaussian_learned":
      return vae_losses.gaussian_log_prob(x, loc, log_scale)
    if kind == "bernoulli":
      return vae_losses.bernoulli_log_prob((x + 1.0) / 2.0, loc)
    return vae_losses.discretized_logistic_log_prob(x, loc, log_scale)

  def mean_of(loc):
    """The decoder's mean E[x | z] on the data scale (clipped to [-1, 1] for images;
    the logistic's location)."""
    if kind == "bernoulli":
      return 2.0 * jax.nn.sigmoid(loc) - 1.0
    return jnp.clip(loc, -1.0, 1.0) if image else loc

  def binarize(x, keys):
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _BINARIZE),
                                              x.shape[1:]))(keys)
    return jnp.where(u < (x + 1.0) / 2.0, 1.0, -1.0)

  def dequantize(x, keys):
    """x̃ = 2(n + u)/256 − 1 of 8-bit x = n/127.5 − 1 (`diffusion.likelihood.dequantize`'s
    bins), u ~ U[0, 1)^D from fold_in(key_j, _DEQUANT)."""
    n = jnp.round((x + 1.0) * 127.5)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _DEQUANT),
                                              x.shape[1:]))(keys)
    return 2.0 * (n + u) / 256.0 - 1.0

  def train_data(x, keys):
    if v.binarize:
      return binarize(x, keys)
    if image and kind in ("gaussian", "gaussian_learned"):
      return dequantize(x, keys)
    return x

  def loss(params, batch, keys, ctx):
    del ctx
    labels = batch["label"].astype(jnp.int32)
    x = train_data(batch["image"].astype(jnp.float32), keys)
    mean, logvar = encode_raw(params, x, labels)
    z_keys = jax.vmap(lambda k: jax.random.fold_in(k, _Z))(keys)
    z = jax.vmap(vae_losses.reparameterize)(z_keys, mean, jnp.exp(0.5 * logvar))
    loc, log_scale = decode_raw(params, z, labels)
    log_px = log_px_z(x, loc, log_scale)
    kl = vae_losses.kl_standard_normal(mean, logvar)
    value = -jnp.mean(vae_losses.elbo(log_px, kl, v.beta))
    metrics = dict(elbo=jnp.mean(vae_losses.elbo(log_px, kl)), kl=jnp.mean(kl),
                   rec=-jnp.mean(log_px))
    return value, (metrics, params)

  players = (Player(loss=loss, tx=tx, schedule=sched, ema_decay=config.train.ema_decay,
                    mask=optim.trainable(config.optim.trainable)),)

  def init(key):
    ke, kd = jax.random.split(key)
    labels = jnp.zeros((1,), jnp.int32)
    params = {"encoder": enc.init(ke, jnp.zeros((1,) + shape, jnp.float32), labels)["params"],
              "decoder": dec.init(kd, jnp.zeros((1, v.latent_dim), jnp.float32),
                                  labels)["params"]}
    return state_lib.init_state(players, params)

  def decode(tree, z, labels=None):
    """x̂ = E[x | z] [B, H, W, C] (clipped to [-1, 1] for images)."""
    return mean_of(decode_raw(tree, z, labels)[0])

  def needs_labels(labels, what):
    if ncls and labels is None:
      raise ValueError(f"{what} of a class-conditional config.task='vae' run "
                       "(config.model.class_conditional) needs the labels")

  def ae_encode(tree, x, labels=None):
    """(mean, std) [B, latent_dim] of q(z | x)."""
    needs_labels(labels, "encoding")
    mean, logvar = encode_raw(tree, x, labels)
    return mean, jnp.exp(0.5 * logvar)

  def ae_decode(tree, z, labels=None):
    needs_labels(labels, "decoding")
    return decode(tree, z, labels)

  def prior(keys, salt: int = _Z):
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt),
                                                (v.latent_dim,)))(keys)

  def sample(*, sampler=None, num_steps=None, guidance=None, strength=1.0, classifier=None):
    """sample_fn(tree, cond, keys [N]) -> (x [N,H,W,C], 1): the decoder's mean at z_i =
    N(fold_in(keys[i], 0)) with labels cond["label"]; when cond has "image" (input
    images), their reconstructions instead: the decoder's mean at the posterior mean.
    A VAE has no sampler, steps, guidance, SDEdit strength or classifier guidance:
    asking for any of them (a value other than config.sample's, which evaluation
    passes through) is an error."""
    s = config.sample
    refuse("a config.task='vae' run generates in one pass",
           sampler=sampler not in (None, s.sampler), steps=num_steps not in (None, s.num_steps),
           guidance=guidance not in (None, s.guidance), strength=strength != 1.0,
           **{"classifier guidance": classifier is not None})

    def sample_fn(tree, cond, keys):
      labels = cond["label"]
      if "image" in cond:  # the cond's structure is static
        z = encode_raw(tree, cond["image"], labels)[0]
      else:
        z = prior(keys)
      return decode(tree, z, labels), 1
    return sample_fn

  def conditioning(labels, *, prompts=None, images=None, mask=None):
    """{"label"} for prior samples; with images [M, H, W, C] in [-1, 1] (cycled to N)
    also {"image"}: reconstruct them."""
    refuse("a config.task='vae' run takes no prompts or masks", prompts=prompts is not None,
           inpainting=mask is not None)
    labels = np.asarray(labels, np.int32)
    cond = {"label": labels}
    if images is not None:
      images = np.asarray(images, np.float32)
      if images.ndim != 4 or images.shape[1:] != shape:
        raise ValueError(f"input images have shape {images.shape}; a config.task='vae' run "
                         f"reconstructs images of shape [N, {', '.join(map(str, shape))}]")
      cond["image"] = np.resize(images, (len(labels),) + shape)
    return cond

  def interpolate(tree, key, labels, num_points: int, method: str = "linear"):
    """Latent interpolation strips (as the gan task's): row r from z0 = N(fold_in(key,
    2r)) to z1 = N(fold_in(key, 2r + 1)) at num_points evenly spaced points ("linear" or
    "slerp", `gan.slerp`), decoded with label r → x [R, num_points, H, W, C]."""
    if method not in ("linear", "slerp"):
      raise ValueError(f"interpolation {method!r}: expected linear | slerp")
    labels = jnp.asarray(labels, jnp.int32)
    rows = labels.shape[0]
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                             (v.latent_dim,)))(jnp.arange(2 * rows))
    z0, z1 = z[0::2, None], z[1::2, None]
    s = jnp.linspace(0.0, 1.0, num_points)[None, :, None]
    zs = (1 - s) * z0 + s * z1 if method == "linear" else gan_task.slerp(z0, z1, s)
    x = decode(tree, zs.reshape(rows * num_points, -1), jnp.repeat(labels, num_points))
    return x.reshape((rows, num_points) + x.shape[1:])

  def log_bounds(tree, x, labels, keys, num_samples: int):
    """{"elbo": [B], "iwae": [B]}: lower bounds on log p(x) (nats) of each example of x
    [B, H, W, C] (module docstring: the data each likelihood describes; binarised here
    with the keys for a Bernoulli decoder). Sample k of example j: z = μ + σ ⊙ ε with
    ε = N(fold_in(fold_in(keys[j], 3), k)), the same samples for both bounds:

        elbo = (1/K) Σ_k log p(x | z_k) − KL(q ‖ p)      (closed-form KL)
        iwae = log (1/K) Σ_k p(x | z_k) p(z_k) / q(z_k | x)   (Burda et al. 2016, eq. 8)

    The K decoder passes run one after another (lax.map): memory of one batch."""
    x = jnp.asarray(x, jnp.float32)
    if v.binarize:
      x = binarize(x, keys)
    labels = _labels(labels, x.shape[0])
    mean, logvar = encode_raw(tree, x, labels)
    std = jnp.exp(0.5 * logvar)
    base = jax.vmap(lambda k: jax.random.fold_in(k, _IW))(keys)

    def one(k):
      eps = jax.vmap(lambda b: jax.random.normal(jax.random.fold_in(b, k),
                                                 (v.latent_dim,)))(base)
      z = mean + std * eps
      loc, log_scale = decode_raw(tree, z, labels)
      log_qz = vae_losses.gaussian_log_prob(z, mean, 0.5 * logvar)
      return log_px_z(x, loc, log_scale), vae_losses.standard_normal_log_prob(z), log_qz

    log_px, log_pz, log_qz = jax.lax.map(one, jnp.arange(num_samples))
    kl = vae_losses.kl_standard_normal(mean, logvar)
    return {"elbo": vae_losses.elbo(log_px, kl), "iwae": vae_losses.iwae(log_px, log_pz, log_qz)}

  generator = Generator(
      sample=sample, conditioning=conditioning, num_classes=ncls, options=(),
      pictures=info.is_image,
      grid=lambda: ({"label": class_grid_labels(ncls, config.sample.per_class)}, ncls or 8),
      interpolate=interpolate)
  autoencoder = Autoencoder(encode=ae_encode, decode=ae_decode, image_shape=shape,
                            latent_shape=(v.latent_dim,), conditional=bool(ncls))
  bound = None
  if kind != "bernoulli" or v.binarize:
    bound = Bound(log_bounds=log_bounds, discrete=kind in ("logistic", "bernoulli"))
  return Task(init=init, players=players, generator=generator, autoencoder=autoencoder,
              bound=bound)
