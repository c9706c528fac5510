"""The U-Net: shapes, zero-initialised output, conditioning, bf16 compute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.nets import UNet, layers


def _net(**kw):
  return UNet(out_channels=1, channels=16, channel_mult=(1, 2), num_res_blocks=1,
              attn_resolutions=(4,), num_heads=2, num_classes=10, **kw)


# Everything under jit: eager flax dispatches (and compiles) op by op, ~10x slower here.
@jax.jit
def _perturbed(params):
  """All params + 0.05·N(0, 1), so the zero-initialised output layer hides nothing."""
  return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)


def test_fresh_model_outputs_zero_and_shapes():
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  net = _net()
  params = jax.jit(net.init)(jax.random.key(1), x, jnp.ones(3), jnp.arange(3))
  out = jax.jit(net.apply)(params, x, jnp.ones(3) * 0.3, jnp.arange(3))
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out))) == 0.0


def test_time_and_class_condition_the_output():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  net = _net()
  params = _perturbed(jax.jit(net.init)(jax.random.key(1), x, jnp.ones(2), jnp.arange(2)))
  apply = jax.jit(net.apply)
  f = lambda t, y: apply(params, x, jnp.full(2, t), jnp.full(2, y))
  assert not np.allclose(f(0.1, 3), f(0.9, 3))
  assert not np.allclose(f(0.5, 3), f(0.5, 10))  # 10 = the null class
  with pytest.raises(ValueError, match="labels"):
    net.apply(params, x, jnp.ones(2))


def test_bfloat16_compute_close_to_float32():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  params = _perturbed(jax.jit(_net().init)(jax.random.key(1), x, jnp.ones(4), jnp.arange(4)))
  ref = jax.jit(_net().apply)(params, x, jnp.full(4, 0.5), jnp.arange(4))
  out = jax.jit(_net(dtype=jnp.bfloat16).apply)(params, x, jnp.full(4, 0.5), jnp.arange(4))
  assert out.dtype == jnp.float32  # output cast back; params stay float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05, rel


def test_timestep_embedding_is_sinusoidal():
  t = jnp.array([0.0, 0.25])
  emb = layers.timestep_embedding(t, 8)
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(250 * freqs), np.sin(250 * freqs)]),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
