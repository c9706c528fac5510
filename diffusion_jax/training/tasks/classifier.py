"""The classifier task: p(y | x_t, t) on a Gaussian path (for classifier guidance), or
p(y | x) on clean images (config.classifier.noise_conditional = False).

x_t and t are drawn exactly as the diffusion task draws them (config.diffusion's path,
time sampling), so a classifier trained here guides a diffusion model of the same path
(`samplers.guidance.classifier`). The network sees x_t / √(a² + b²), an input of
roughly unit scale on every path (VE's x_t grows to σ_max). It has no sampler.

In a latent space (a latent cache, or config.latent.autoencoder: `latent.py`) it
classifies the scaled latents a latent-diffusion model of the same settings samples,
so it guides that model; it then offers no `features` (evaluation compares pixels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import nets
from diffusion_jax.diffusion import losses, paths
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks import latent as latent_lib
from diffusion_jax.training.tasks.base import Features, Guide, Player, Task


def model(config, info):
  return nets.build_classifier(config.model, info.num_classes)


def _normalise(path, x_t, t):
  a, b = path.ab(t)
  return x_t * jax.lax.rsqrt(a ** 2 + b ** 2).reshape((-1,) + (1,) * (x_t.ndim - 1))


def make(config, info) -> Task:
  """Capabilities: `features` (logits and pooled features of clean images: the domain
  feature network of evaluation) and `guide` (log p(y | x_t, t) for classifier
  guidance of models on the same path, when trained on noisy inputs)."""
  space = latent_lib.space(config, info)
  if space is not None:
    info = space.latent_info
  net, path = model(config, info), paths.from_config(config.diffusion)
  tx, sched = optim.make(config.optim, config.train.num_steps)
  noisy = config.classifier.noise_conditional

  def logits(params, x_t, t):
    """[B, num_classes] of x_t [B,H,W,C] at t [B] (t = 0: clean images)."""
    return net.apply({"params": params}, _normalise(path, x_t, t), t)

  def features(params, x):
    t = jnp.zeros((x.shape[0],), jnp.float32)
    return net.apply({"params": params}, _normalise(path, x, t), t, features=True)

  def log_prob(params, x_t, t, labels):
    logp = jax.nn.log_softmax(logits(params, x_t, t))
    return jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]

  def init(key):
    x = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
    return state_lib.init_state(players, net.init(key, x, jnp.zeros((1,)))["params"])

  def loss(params, batch, keys, ctx):
    x0 = batch["image"] if space is None else space.draw(batch, keys)
    labels = batch["label"]
    if noisy:
      t, _, x_t, _ = jax.vmap(lambda k, x: losses.noise_example(
          config.diffusion, path, k, x, 0, 0))(keys, x0)
    else:
      t, x_t = jnp.zeros((x0.shape[0],)), x0
    out = net.apply({"params": params}, _normalise(path, x_t, t), t, train=True,
                    rngs={"dropout": ctx.dropout_key})
    value = optax.softmax_cross_entropy_with_integer_labels(out, labels)
    accuracy = jnp.mean((jnp.argmax(out, -1) == labels).astype(jnp.float32))
    return jnp.mean(value), ({"accuracy": accuracy}, params)

  players = (Player(loss=loss, tx=tx, schedule=sched, ema_decay=config.train.ema_decay,
                    mask=optim.trainable(config.optim.trainable)),)
  return Task(init=init, players=players,
              features=None if space else Features(image=features, num_classes=info.num_classes),
              guide=Guide(log_prob=log_prob, path=path, noise_conditional=noisy,
                          image_shape=tuple(info.image_shape), num_classes=info.num_classes))
