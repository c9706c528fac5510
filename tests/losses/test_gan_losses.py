"""Adversarial losses against closed forms: the optimal discriminator D* = p_r/(p_r + p_g)
of known 1-D densities, the non-saturating vs saturating generator gradients when D
rejects the fakes, and the WGAN-GP / R1 penalties of discriminators with known input
gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from diffusion_jax import config as config_lib
from diffusion_jax.losses import gan as gan_losses
from diffusion_jax.nets import gan as gan_nets

# p_r = N(0, 1), p_g = N(1.5, 0.8²): fixed and known.
P_R, P_G = stats.norm(0.0, 1.0), stats.norm(1.5, 0.8)


def test_losses_match_their_probability_formulas():
  r = np.array([-3.0, -0.5, 0.0, 0.7, 4.0], np.float32)
  f = np.array([-2.0, 0.3, 1.0, -0.1, 2.5], np.float32)
  d_r, d_f = 1 / (1 + np.exp(-r)), 1 / (1 + np.exp(-f))
  expect_d = {"minimax": -np.mean(np.log(d_r)) - np.mean(np.log(1 - d_f)),
              "hinge": np.mean(np.maximum(0, 1 - r)) + np.mean(np.maximum(0, 1 + f)),
              "lsgan": 0.5 * np.mean((r - 1) ** 2) + 0.5 * np.mean(f ** 2),
              "wgan": np.mean(f) - np.mean(r)}
  expect_d["non_saturating"] = expect_d["minimax"]
  expect_g = {"minimax": np.mean(np.log(1 - d_f)), "non_saturating": -np.mean(np.log(d_f)),
              "hinge": -np.mean(f), "lsgan": 0.5 * np.mean((f - 1) ** 2), "wgan": -np.mean(f)}
  for kind in gan_losses.LOSSES:
    assert float(gan_losses.discriminator_loss(kind, r, f)) == pytest.approx(expect_d[kind], rel=1e-5)
    assert float(gan_losses.generator_loss(kind, f)) == pytest.approx(expect_g[kind], rel=1e-5)
  with pytest.raises(ValueError, match="config.gan.loss"):
    gan_losses.generator_loss("wasserstein", f)


def _mlp_discriminator():
  c = config_lib.base()
  c.task = "gan"
  c.gan.discriminator, c.gan.d_norm, c.gan.mlp_width, c.gan.mlp_depth = "mlp", "none", 64, 2
  c.model.class_conditional = False
  return gan_nets.build_discriminator(c, (1, 1, 1), 0)


@functools.cache
def _train_discriminator(kind: str, steps: int = 3000, batch: int = 512):
  """The project's MLP discriminator trained by `kind`'s discriminator loss on fresh
  samples of the fixed p_r and p_g (one lax.scan) → logits on a grid [−2, 3]."""
  net = _mlp_discriminator()
  x0 = jnp.zeros((1, 1, 1, 1))
  labels = jnp.zeros((batch,), jnp.int32)
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))  # decay: less SGD noise at the end

  def loss(params, key):
    kr, kg = jax.random.split(key)
    real = jax.random.normal(kr, (batch, 1, 1, 1))
    fake = 1.5 + 0.8 * jax.random.normal(kg, (batch, 1, 1, 1))
    apply = lambda x: net.apply({"params": params}, x, labels)
    return gan_losses.discriminator_loss(kind, apply(real), apply(fake))

  # 3000 steps in one program: run time, not compile time, dominates here, so the
  # fusion emitters that the tests' XLA_FLAGS turn off (conftest) are on (~2x faster).
  @functools.partial(jax.jit, compiler_options={"xla_cpu_use_fusion_emitters": True})
  def run(key):
    params = net.init(key, x0, labels[:1])["params"]

    def body(carry, k):
      params, opt = carry
      grads = jax.grad(loss)(params, k)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt), None
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)),
                                  jax.random.split(jax.random.fold_in(key, 1), steps))
    grid = jnp.linspace(-2.0, 3.0, 101).reshape(-1, 1, 1, 1)
    return net.apply({"params": params}, grid, jnp.zeros((101,), jnp.int32))
  return np.linspace(-2.0, 3.0, 101), np.asarray(run(jax.random.key(0)))


@pytest.mark.parametrize("kind", ["minimax", "lsgan"])
def test_trained_discriminator_approaches_the_optimal_one(kind):
  """D*(x) = p_r(x) / (p_r(x) + p_g(x)) (Goodfellow et al. 2014, Prop. 1). For the
  minimax loss D = σ(logit); for LSGAN with targets 0 / 1 the optimum of the logit itself
  is the same ratio (Mao et al. 2017)."""
  x, logits = _train_discriminator(kind)
  d = 1 / (1 + np.exp(-logits)) if kind == "minimax" else logits
  d_star = P_R.pdf(x) / (P_R.pdf(x) + P_G.pdf(x))
  err = np.abs(d - d_star)
  print(f"\n{kind}: max |D − D*| on [−2, 3] = {err.max():.4f}, mean {err.mean():.4f}")
  assert err.max() < 0.03 and err.mean() < 0.01
  # Far from the optimum of a random discriminator: the test can fail.
  assert np.abs(0.5 - d_star).max() > 0.4


def test_non_saturating_gradient_is_larger_when_d_rejects_fakes():
  """The notes' argument: when D(G(z)) ≈ 0 early in training, log(1 − D(G(z))) is flat
  and its gradient vanishes; −log D(G(z)) has a large gradient there. With D's logit
  l = w·x + b fixed, ∂loss/∂l is −σ(l) (saturating) vs −(1 − σ(l)) (non-saturating), so
  the generator gradients differ by the factor (1 − D)/D ≈ 1/D."""
  c = config_lib.base()
  c.task, c.model.class_conditional = "gan", False
  c.gan.generator, c.gan.mlp_width, c.gan.mlp_depth, c.gan.latent_dim = "mlp", 32, 2, 4
  g = gan_nets.build_generator(c, (1, 1, 2), 0)
  z = jax.random.normal(jax.random.key(0), (256, 4))
  labels = jnp.zeros((256,), jnp.int32)
  g_vars = g.init(jax.random.key(1), z[:1], labels[:1], train=False)
  w = jnp.array([0.3, -0.2])

  def grads(kind, bias):
    def loss(params):
      x = g.apply(dict(g_vars, params=params), z, labels, train=False)
      logits = x.reshape(-1, 2) @ w + bias
      return gan_losses.generator_loss(kind, logits), jnp.mean(jax.nn.sigmoid(logits))
    (_, d_mean), gr = jax.value_and_grad(loss, has_aux=True)(g_vars["params"])
    return float(optax.tree.norm(gr)), float(d_mean)

  sat, d_fake = grads("minimax", -8.0)
  ns, _ = grads("non_saturating", -8.0)
  print(f"\nD(G(z)) ≈ {d_fake:.2e}: ‖∇ saturating‖ = {sat:.3e}, ‖∇ non-saturating‖ = "
        f"{ns:.3e}, ratio {ns / sat:.0f}")
  assert d_fake < 1e-3
  assert ns / sat == pytest.approx((1 - d_fake) / d_fake, rel=0.1)
  # Where D accepts the fakes (D ≈ 1) it is the other way round.
  sat1, _ = grads("minimax", 8.0)
  ns1, _ = grads("non_saturating", 8.0)
  assert sat1 / ns1 > 1000


def test_gradient_penalty_and_r1_of_known_gradients():
  """A linear critic l(x) = w·x has ∇l = w everywhere: GP = (‖w‖ − 1)², R1 = ‖w‖².
  A quadratic one l(x) = ½‖x‖² has ∇l = x: R1 = E‖x‖², GP at x̂ = εx + (1 − ε)y is
  E(‖x̂‖ − 1)²."""
  rng = np.random.default_rng(0)
  real = jnp.asarray(rng.normal(size=(16, 4, 4, 3)), jnp.float32)
  fake = jnp.asarray(rng.normal(size=(16, 4, 4, 3)), jnp.float32)
  eps = jnp.asarray(rng.uniform(size=16), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 4, 3)), jnp.float32)
  linear = lambda x: jnp.sum(x * w, axis=(1, 2, 3))
  norm_w = float(jnp.linalg.norm(w))
  assert float(gan_losses.gradient_penalty(linear, real, fake, eps)) == pytest.approx(
      (norm_w - 1) ** 2, rel=1e-5)
  assert float(gan_losses.r1_penalty(linear, real)) == pytest.approx(norm_w ** 2, rel=1e-5)
  quad = lambda x: 0.5 * jnp.sum(x ** 2, axis=(1, 2, 3))
  r, f, e = np.asarray(real), np.asarray(fake), np.asarray(eps)[:, None, None, None]
  x_hat = (e * r + (1 - e) * f).reshape(16, -1)
  assert float(gan_losses.r1_penalty(quad, real)) == pytest.approx(
      np.mean(np.sum(r.reshape(16, -1) ** 2, 1)), rel=1e-5)
  assert float(gan_losses.gradient_penalty(quad, real, fake, eps)) == pytest.approx(
      np.mean((np.linalg.norm(x_hat, axis=1) - 1) ** 2), rel=1e-5)
