"""Adversarial losses on discriminator logits (plain jax.numpy).

D(x) = σ(l(x)) for the logit l the discriminator outputs. With p_r the data, p_g the
generator's distribution and every expectation a batch mean (over patches too, for a
PatchGAN's [B, h, w] logits):

| loss             | discriminator minimises                  | generator minimises       |
|------------------|------------------------------------------|---------------------------|
| `minimax`        | −E log D(x) − E log(1 − D(G(z)))         | E log(1 − D(G(z)))        |
| `non_saturating` | same                                     | −E log D(G(z))            |
| `hinge`          | E max(0, 1 − l(x)) + E max(0, 1 + l(G(z))) | −E l(G(z))              |
| `lsgan`          | ½E (l(x) − 1)² + ½E l(G(z))²             | ½E (l(G(z)) − 1)²         |
| `wgan`           | E l(G(z)) − E l(x)                       | −E l(G(z))                |

(Goodfellow et al. 2014; hinge: Lim & Ye 2017, Miyato et al. 2018; LSGAN: Mao et al.
2017 with a = 0, b = c = 1; WGAN: Arjovsky et al. 2017.) log σ(l) = −softplus(−l) and
log(1 − σ(l)) = −softplus(l), so no probability is ever formed. The optimal
discriminator of the minimax game is D*(x) = p_r(x) / (p_r(x) + p_g(x)).

Penalties (added to the discriminator loss by the gan task, each with its weight):
WGAN-GP's E[(‖∇ₓ l(x̂)‖ − 1)²] at x̂ = εx + (1 − ε)G(z), ε ~ U[0, 1] per example
(Gulrajani et al. 2017), and R1's E[‖∇ₓ l(x)‖²] on real data (Mescheder et al. 2018;
the task multiplies by γ/2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("minimax", "non_saturating", "hinge", "lsgan", "wgan")


def _check(kind: str):
  if kind not in LOSSES:
    raise ValueError(f"config.gan.loss={kind!r}: expected one of {list(LOSSES)}")


def discriminator_loss(kind: str, real_logits, fake_logits):
  """The discriminator's loss (a scalar) from its logits on real and generated data."""
  _check(kind)
  if kind in ("minimax", "non_saturating"):
    return jnp.mean(jax.nn.softplus(-real_logits)) + jnp.mean(jax.nn.softplus(fake_logits))
  if kind == "hinge":
    return jnp.mean(jax.nn.relu(1 - real_logits)) + jnp.mean(jax.nn.relu(1 + fake_logits))
  if kind == "lsgan":
    return 0.5 * jnp.mean((real_logits - 1) ** 2) + 0.5 * jnp.mean(fake_logits ** 2)
  return jnp.mean(fake_logits) - jnp.mean(real_logits)


def generator_loss(kind: str, fake_logits):
  """The generator's loss (a scalar) from the discriminator's logits on G(z)."""
  _check(kind)
  if kind == "minimax":
    return -jnp.mean(jax.nn.softplus(fake_logits))  # E log(1 − σ(l))
  if kind == "non_saturating":
    return jnp.mean(jax.nn.softplus(-fake_logits))  # −E log σ(l)
  if kind == "lsgan":
    return 0.5 * jnp.mean((fake_logits - 1) ** 2)
  return -jnp.mean(fake_logits)  # hinge, wgan


def _input_grad_sq_norms(logits_fn, x):
  """‖∇ₓ Σ l(x_i)‖² per example [B]: per-example input gradients, valid when examples
  do not interact inside logits_fn (no BatchNorm in training mode)."""
  grads = jax.grad(lambda v: jnp.sum(logits_fn(v)))(x)
  return jnp.sum(grads.reshape(grads.shape[0], -1).astype(jnp.float32) ** 2, axis=1)


def gradient_penalty(logits_fn, real, fake, eps):
  """WGAN-GP: E[(‖∇ l(x̂)‖ − 1)²], x̂ = eps·real + (1 − eps)·fake; eps [B] in [0, 1]."""
  eps = eps.reshape((-1,) + (1,) * (real.ndim - 1))
  x_hat = eps * real + (1 - eps) * fake
  return jnp.mean((jnp.sqrt(_input_grad_sq_norms(logits_fn, x_hat) + 1e-12) - 1) ** 2)


def r1_penalty(logits_fn, real):
  """R1: E[‖∇ l(x)‖²] on real data (the task applies γ/2)."""
  return jnp.mean(_input_grad_sq_norms(logits_fn, real))
