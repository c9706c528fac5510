"""A domain classifier trained on real images, to check that class-conditional samples
show their requested class (the quickstart's acceptance metric).

A small MLP on flattened images, trained full-batch with Adam. It is deliberately
independent of the generative model: it sees only real training images.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
  num_classes: int
  hidden: int = 256

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


def train(images: np.ndarray, labels: np.ndarray, num_classes: int, *, steps: int = 500,
          lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0):
  """images float [N, H, W, C] in [-1, 1], labels int [N] → params of an MLP."""
  net = MLP(num_classes)
  params = net.init(jax.random.key(seed), jnp.asarray(images[:1]))
  tx = optax.adamw(lr, weight_decay=weight_decay)
  x, y = jnp.asarray(images), jnp.asarray(labels)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(net.apply(p, x), y).mean()

  @jax.jit
  def fit(params):
    def step(carry, _):
      p, o = carry
      g = jax.grad(loss)(p)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  return fit(params)


def predict(params, images: np.ndarray, num_classes: int) -> np.ndarray:
  """Predicted labels int [N]."""
  return np.asarray(jnp.argmax(MLP(num_classes).apply(params, jnp.asarray(images)), -1))


def accuracy(params, images, labels, num_classes: int) -> float:
  return float(np.mean(predict(params, images, num_classes) == np.asarray(labels)))
