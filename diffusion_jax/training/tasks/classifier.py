"""The classifier task: p(y | x_t, t) on a Gaussian path (for classifier guidance), or
p(y | x) on clean images (config.classifier.noise_conditional = False).

x_t and t are drawn exactly as the diffusion task draws them (config.diffusion's path,
time sampling), so a classifier trained here guides a diffusion model of the same path
(`samplers.guidance.classifier`). The network sees x_t / √(a² + b²), an input of
roughly unit scale on every path (VE's x_t grows to σ_max). It has no sampler.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from diffusion_jax import nets
from diffusion_jax.diffusion import losses, paths
from diffusion_jax.training import optim, step as step_lib
from diffusion_jax.training.state import TrainState


def model(config, info):
  return nets.build_classifier(config.model, info.num_classes)


def _normalise(path, x_t, t):
  a, b = path.ab(t)
  return x_t * jax.lax.rsqrt(a ** 2 + b ** 2).reshape((-1,) + (1,) * (x_t.ndim - 1))


def init(config, key, info) -> TrainState:
  x = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  params = model(config, info).init(key, x, jnp.zeros((1,)))["params"]
  tx, _ = optim.make(config.optim, config.train.num_steps)
  return TrainState.create(params, tx)


def logits_fn(config, info):
  """logits(params, x_t [B,H,W,C], t [B]) -> [B, num_classes] (t = 0: clean images)."""
  net, path = model(config, info), paths.from_config(config.diffusion)
  return lambda params, x_t, t: net.apply({"params": params}, _normalise(path, x_t, t), t)


def features_fn(config, info):
  """features(params, x [B,H,W,C]) -> (logits [B, C], pooled features [B, D]) of clean
  images (t = 0): the domain feature network of `evaluation/`."""
  net, path = model(config, info), paths.from_config(config.diffusion)

  def features(params, x):
    t = jnp.zeros((x.shape[0],), jnp.float32)
    return net.apply({"params": params}, _normalise(path, x, t), t, features=True)
  return features


def log_prob_fn(config, info):
  """log_prob(params, x_t, t [B], labels [B]) -> log p(y_i | x_t_i, t_i) [B]."""
  logits = logits_fn(config, info)

  def log_prob(params, x_t, t, labels):
    logp = jax.nn.log_softmax(logits(params, x_t, t))
    return jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
  return log_prob


def train_step(config, info):
  net, path = model(config, info), paths.from_config(config.diffusion)
  tx, sched = optim.make(config.optim, config.train.num_steps)
  noisy = config.classifier.noise_conditional

  def loss_fn(params, batch, keys, dropout_key):
    x0, labels = batch["image"], batch["label"]
    if noisy:
      t, _, x_t, _ = jax.vmap(lambda k, x: losses.noise_example(
          config.diffusion, path, k, x, 0, 0))(keys, x0)
    else:
      t, x_t = jnp.zeros((x0.shape[0],)), x0
    logits = net.apply({"params": params}, _normalise(path, x_t, t), t, train=True,
                       rngs={"dropout": dropout_key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    return jnp.mean(loss), {"accuracy": accuracy}

  return step_lib.make_train_step(loss_fn, tx, sched, ema_decay=config.train.ema_decay)
