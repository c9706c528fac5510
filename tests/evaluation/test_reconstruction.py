"""Evaluation of latent-variable models and autoencoders against closed forms, with a
hand-made linear-Gaussian model (a real model, small enough to know exactly):

    z ~ N(0, I_d),   x | z ~ N(Wz + b, σ²I_D)   ⇒   x ~ N(b, WWᵀ + σ²I)   (Tipping &
    Bishop 1999), posterior p(z | x) = N(M⁻¹Wᵀ(x − b)/σ², M⁻¹), M = I + WᵀW/σ².

- bpd_elbo / bpd_iwae (`run.bound_bits_per_dim`): with the exact posterior as q every
  importance weight is p(x), so ELBO = IWAE = log p(x̃) for every example, and the
  bits/dim equal (−log N(x̃; b, WWᵀ + σ²I) + D·log 128)/(D ln 2) on the dequantised x̃;
  with a worse q, ELBO < IWAE_k ≤ log p (in the mean), IWAE increasing in k; a
  discrete bound is −log P/(D ln 2) of the 8-bit values themselves; numbers do not
  depend on the batch or the devices.
- psnr, ssim, lpips, rfd (`reconstruction.reconstruction_metrics`): the identity
  autoencoder gives +inf, 1, 0, 0; a lossy (and class-conditional) one gives what
  `metrics.psnr`, `metrics.ssim`, `lpips.lpips` and the Fréchet distance give on the
  same reconstructions, on 8 devices with a padded last batch.
- make_evaluator's wiring and its refusals (a metric the run cannot compute names
  itself and what is missing).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import tiny_config
from diffusion_jax import config as config_lib, data, parallel
from diffusion_jax.diffusion import likelihood
from diffusion_jax.evaluation import metrics, reconstruction, run as eval_run
from diffusion_jax.nets import lpips
from diffusion_jax.training import tasks

LOG_2PI = math.log(2 * math.pi)


def _normal_logpdf(x, mean, std):
  return jnp.sum(-0.5 * (LOG_2PI + ((x - mean) / std) ** 2) - jnp.log(std), axis=-1)


def linear_gaussian(shape, latent_dim: int, seed: int = 0, sigma: float = 0.1):
  """(params, Bound, Autoencoder) of the linear-Gaussian model on images of `shape`.
  params["mean_scale"], params["std_scale"] scale q's mean and std away from the
  exact posterior (1, 1: exact)."""
  D = int(np.prod(shape))
  rng = np.random.default_rng(seed)
  params = {"W": (0.4 * rng.standard_normal((D, latent_dim))).astype(np.float32),
            "b": rng.uniform(-0.3, 0.3, D).astype(np.float32),
            "sigma": np.float32(sigma), "mean_scale": np.float32(1), "std_scale": np.float32(1)}

  def posterior(p, x):
    """q(z | x) = N(mean_scale·m(x), std_scale²·C): (mean [B, d], Cholesky factor of
    the covariance [d, d]); (1, 1) is the exact posterior N(m(x), C)."""
    W, s2 = p["W"], p["sigma"] ** 2
    cov = jnp.linalg.inv(jnp.eye(latent_dim) + W.T @ W / s2)
    mean = (x.reshape(len(x), D) - p["b"]) @ W @ cov / s2
    return p["mean_scale"] * mean, p["std_scale"] * jnp.linalg.cholesky(cov)

  def log_bounds(p, x, labels, keys, k):
    mean, chol = posterior(p, x)
    eps = jax.vmap(lambda key: jax.random.normal(key, (k, latent_dim)))(keys)   # [B, k, d]
    z = mean[:, None] + eps @ chol.T
    log_q = (jnp.sum(-0.5 * (LOG_2PI + eps ** 2), axis=-1)
             - jnp.sum(jnp.log(jnp.diag(chol))))
    x_flat = x.reshape(len(x), 1, D)
    log_w = (_normal_logpdf(x_flat, z @ p["W"].T + p["b"], p["sigma"])
             + _normal_logpdf(z, 0.0, 1.0) - log_q)
    return {"elbo": jnp.mean(log_w, axis=1),
            "iwae": jax.nn.logsumexp(log_w, axis=1) - math.log(k)}

  def encode(p, x, labels):
    mean, chol = posterior(p, x)   # the Autoencoder's diagonal-Gaussian view of q
    return mean, jnp.broadcast_to(jnp.sqrt(jnp.sum(chol ** 2, axis=1)), mean.shape)

  def decode(p, z, labels):
    return jnp.clip(z @ p["W"].T + p["b"], -1, 1).reshape((len(z),) + tuple(shape))

  bound = tasks.Bound(log_bounds=log_bounds)
  ae = tasks.Autoencoder(encode=encode, decode=decode, image_shape=tuple(shape),
                         latent_shape=(latent_dim,))
  return params, bound, ae


def exact_log_p(params, x):
  """log N(x; b, WWᵀ + σ²I) [N], float64."""
  W, b, s = (np.asarray(params[k], np.float64) for k in ("W", "b", "sigma"))
  cov = W @ W.T + s ** 2 * np.eye(len(b))
  return stats.multivariate_normal(b, cov).logpdf(np.asarray(x, np.float64).reshape(len(x), -1))


def eight_bit(params, n: int, shape, seed: int = 1):
  """n images [n, *shape] drawn from the model, quantised to 8 bits (x = m/127.5 − 1)."""
  rng = np.random.default_rng(seed)
  W, b, s = params["W"], params["b"], params["sigma"]
  x = rng.standard_normal((n, W.shape[1])) @ W.T + b + s * rng.standard_normal((n, len(b)))
  return (np.round((np.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1).astype(np.float32).reshape(
      (n,) + tuple(shape))


def dequantised(x, seed: int):
  """x̃ of `bound_bits_per_dim`'s documented protocol: example i alone, key
  split(fold_in(key(seed), i))[0]."""
  f = jax.jit(lambda x, i: likelihood.dequantize(
      jax.random.split(jax.random.fold_in(jax.random.key(seed), i))[0], x[None])[0])
  return np.stack([np.asarray(f(x[i], i)) for i in range(len(x))])


SHAPE = (2, 2, 1)   # D = 4


@pytest.fixture(scope="module")
def mesh1():
  return parallel.make_mesh(config_lib.base().mesh, jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh8():
  return parallel.make_mesh(config_lib.base().mesh, jax.devices())


def test_exact_posterior_bounds_equal_the_closed_form(mesh1, mesh8):
  params, bound, _ = linear_gaussian(SHAPE, 2)
  x = eight_bit(params, 40, SHAPE)
  labels = np.zeros(len(x), np.int32)
  bpd = eval_run.bound_bits_per_dim(bound, params, x, labels, mesh1, num_samples=8, seed=3)
  D = x[0].size
  want = (-exact_log_p(params, dequantised(x, 3)) + D * math.log(128)) / (D * math.log(2))
  np.testing.assert_allclose(bpd["elbo"], want, rtol=1e-5)
  np.testing.assert_allclose(bpd["iwae"], want, rtol=1e-5)
  # Not the un-dequantised density: the protocol's x̃ is what was scored.
  assert np.abs((-exact_log_p(params, x) + D * math.log(128)) / (D * math.log(2)) - want).max() > 1e-3
  # 8 devices, batches of 16 (the last padded) == 1 device, one batch.
  bpd8 = eval_run.bound_bits_per_dim(bound, params, x, labels, mesh8, num_samples=8, seed=3,
                                     batch=16)
  for m in ("elbo", "iwae"):
    np.testing.assert_allclose(bpd8[m], bpd[m], rtol=1e-6)


def test_worse_posterior_orders_elbo_iwae_exact(mesh1):
  params, bound, _ = linear_gaussian(SHAPE, 2)
  params = {**params, "mean_scale": np.float32(0.7), "std_scale": np.float32(1.6)}
  x = eight_bit(params, 400, SHAPE, seed=2)
  labels = np.zeros(len(x), np.int32)
  D = x[0].size
  exact = (-exact_log_p(params, dequantised(x, 0)) + D * math.log(128)) / (D * math.log(2))
  by_k = {k: eval_run.bound_bits_per_dim(bound, params, x, labels, mesh1, num_samples=k)
          for k in (1, 64)}
  np.testing.assert_allclose(by_k[1]["iwae"], by_k[1]["elbo"], rtol=1e-6)   # k = 1: IWAE = ELBO

  def mean_se(v):
    return v.mean(), v.std() / np.sqrt(len(v))
  gap_elbo, se_elbo = mean_se(by_k[64]["elbo"] - exact)
  gap_iwae, se_iwae = mean_se(by_k[64]["iwae"] - exact)
  gain, se_gain = mean_se(by_k[64]["elbo"] - by_k[64]["iwae"])
  assert gap_elbo > 5 * se_elbo and gap_elbo > 0.05   # the ELBO is a clear upper bound in bits
  assert gap_iwae > -3 * se_iwae                      # IWAE too (within noise) ...
  assert gain > 5 * se_gain and gap_iwae < 0.5 * gap_elbo   # ... and much tighter
  assert by_k[64]["iwae"].mean() < by_k[1]["iwae"].mean()


def test_discrete_bound_is_not_dequantised(mesh1):
  """p(n | z) = DDPM's discretised Gaussian N(b, s²) per pixel, q = the prior, so every
  weight is P(n): bpd = −log P(n)/(D ln 2) of the 8-bit values themselves."""
  b, log_s = np.float32(0.1), np.float32(math.log(0.3))

  def log_bounds(p, x, labels, keys, k):
    log_p = jnp.sum(likelihood.discretized_gaussian_log_likelihood(x, b, log_s).reshape(len(x), -1),
                    axis=1)
    return {"elbo": log_p, "iwae": log_p}

  x = (np.arange(256, dtype=np.float32) / 127.5 - 1).reshape(16, 4, 4, 1)   # every 8-bit value
  bpd = eval_run.bound_bits_per_dim(tasks.Bound(log_bounds=log_bounds, discrete=True), {},
                                    x, np.zeros(16, np.int32), mesh1, num_samples=2)
  s, lo, hi = math.exp(log_s), x - 1 / 255, x + 1 / 255
  p = (np.where(x > 0.999, 1, stats.norm.cdf(hi, b, s))
       - np.where(x < -0.999, 0, stats.norm.cdf(lo, b, s)))
  want = -np.log(p).reshape(16, -1).sum(1) / (16 * math.log(2))
  np.testing.assert_allclose(bpd["elbo"], want, rtol=1e-5)


# ----------------------------------------------------------------------------------
# Reconstruction.

IMG = (64, 64, 3)   # (XLA:CPU runs VGG at 16×16 or 32×32 several times slower than at 64×64: 1×1, 2×2 maps)


def _smooth_images(n, seed=0):
  rng = np.random.default_rng(seed)
  low = rng.uniform(-1, 1, (n, 8, 8, 3)).astype(np.float32)
  return np.clip(np.asarray(jax.image.resize(low, (n,) + IMG, "bilinear"))
                 + 0.05 * rng.standard_normal((n,) + IMG), -1, 1).astype(np.float32)


def _pooled(x, labels):
  """2×2 average pool, nearest upsample, + 0.02·label: a lossy conditional autoencoder."""
  B, H, W, C = x.shape
  z = x.reshape(B, H // 2, 2, W // 2, 2, C).mean((2, 4))
  up = jnp.repeat(jnp.repeat(z, 2, 1), 2, 2)
  return jnp.clip(up + 0.02 * labels[:, None, None, None], -1, 1)


@pytest.fixture(scope="module")
def lpips_variables():
  shapes = jax.eval_shape(lpips.LPIPS().init, jax.random.key(0),
                          *[jax.ShapeDtypeStruct((1,) + IMG, jnp.float32)] * 2)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
                           shapes)
  p = variables["params"]
  for k in range(5):
    p[f"lin{k}"] = np.abs(p[f"lin{k}"])
  return variables


def _feature_net(mesh):
  proj = np.random.default_rng(5).standard_normal((int(np.prod(IMG)), 6)).astype(np.float32) / 20
  return eval_run.FeatureNet(
      "domain", lambda p, x: (jnp.zeros((len(x), 1)), jnp.tanh(x.reshape(len(x), -1) @ p)),
      jax.device_put(proj, parallel.replicated(mesh)), "", "test")


def test_reconstruction_metrics(mesh1, mesh8, lpips_variables):
  x = _smooth_images(20)
  labels = np.arange(20, dtype=np.int32) % 3
  identity = tasks.Autoencoder(encode=lambda p, x, y: (x, jnp.zeros_like(x)),
                               decode=lambda p, z, y: z, image_shape=IMG, latent_shape=IMG)
  lossy = tasks.Autoencoder(encode=lambda p, x, y: (x, jnp.zeros_like(x)),
                            decode=lambda p, z, y: _pooled(z, y), image_shape=IMG,
                            latent_shape=IMG, conditional=True)
  same = reconstruction.reconstruction_metrics(identity, {}, x, labels, mesh1,
                                               metrics=("psnr", "ssim", "rfd"),
                                               nets=[_feature_net(mesh1)])
  assert same["psnr"] == np.inf and same["ssim"] == pytest.approx(1.0, abs=1e-12)
  assert abs(same["rfd_domain"]) < 1e-9 and "lpips" not in same   # (LPIPS(x, x) = 0: test_lpips)
  assert same["reconstruction_images"] == 20

  got = reconstruction.reconstruction_metrics(lossy, {}, x, labels, mesh8, batch=16,
                                              metrics=reconstruction.METRICS,
                                              nets=[_feature_net(mesh8)],
                                              lpips_variables=lpips_variables)
  x_hat = np.asarray(_pooled(x, labels))
  for name, per_image in (("psnr", metrics.psnr(x, x_hat)), ("ssim", metrics.ssim(x, x_hat)),
                          ("lpips", np.asarray(jax.jit(lpips.lpips)(lpips_variables, x, x_hat)))):
    np.testing.assert_allclose(got[name], per_image.mean(), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got[name + "_stderr"], per_image.std() / np.sqrt(20), rtol=1e-4,
                               err_msg=name)
  proj = np.asarray(_feature_net(mesh1).params, np.float64)
  fx, fy = (np.tanh(a.reshape(20, -1).astype(np.float64) @ proj) for a in (x, x_hat))
  want = metrics.frechet_distance(fx.mean(0), np.cov(fx.T), fy.mean(0), np.cov(fy.T))
  np.testing.assert_allclose(got["rfd_domain"], want, rtol=1e-4)
  assert got["rfd_domain"] > 0 and 10 < got["psnr"] < 60 and 0 < got["ssim"] < 1
  assert got["lpips"] > 0


# ----------------------------------------------------------------------------------
# make_evaluator: wiring and refusals.


@pytest.fixture
def hand_made(monkeypatch, data_dir):
  """A config of the digits (8×8×1) whose task is the linear-Gaussian model (bound and
  autoencoder), or the same model with capabilities removed: make(**removed)."""
  params, bound, ae = linear_gaussian((8, 8, 1), 4, sigma=0.2)
  params = {**params, "mean_scale": np.float32(0.8)}   # q worse than the posterior
  info = data.get_source("sklearn_digits", "test", data_dir)[1]

  def make(**caps):
    task = tasks.Task(init=lambda key: None, players=(),
                      **{"bound": bound, "autoencoder": ae, **caps})
    monkeypatch.setattr(eval_run.tasks, "make", lambda config, info: task)
    return task
  return params, info, make


def test_evaluator_reports_bounds_and_reconstructions(hand_made, data_dir, mesh1, tmp_path):
  params, info, make = hand_made
  task = make()
  config = tiny_config(data_dir)
  config.eval.metrics = ("bpd_elbo", "bpd_iwae", "psnr", "ssim")
  config.eval.likelihood_images, config.eval.num_samples, config.eval.iwae_samples = 24, 30, 5
  config.eval.batch_size = 16
  res = eval_run.make_evaluator(config, info, str(tmp_path), mesh1)(7, params)
  images, labels = data.load_arrays("sklearn_digits", "test", data_dir)
  bpd = eval_run.bound_bits_per_dim(task.bound, params, images[:24], labels[:24], mesh1,
                                    num_samples=5, seed=config.eval.seed)
  for m in ("elbo", "iwae"):
    np.testing.assert_allclose(res[f"bpd_{m}"], bpd[m].mean(), rtol=1e-6)
    np.testing.assert_allclose(res[f"bpd_{m}_stderr"], bpd[m].std() / np.sqrt(24), rtol=1e-5)
  assert res["bpd_elbo"] > res["bpd_iwae"] > 0
  assert (res["likelihood_images"], res["iwae_samples"], res["reconstruction_images"]) == (24, 5, 30)
  x_hat = np.asarray(reconstruction.reconstruct(task.autoencoder, params, images[:30], None))
  np.testing.assert_allclose(res["psnr"], metrics.psnr(images[:30], x_hat).mean(), rtol=1e-5)
  assert (tmp_path / "eval" / "7.json").exists()


def test_evaluator_refuses_what_the_run_cannot_compute(hand_made, data_dir, mesh1, tmp_path):
  _, info, make = hand_made
  config = tiny_config(data_dir)

  def refused(metric_list, match, **caps):
    make(**caps)
    config.eval.metrics = metric_list
    with pytest.raises(ValueError, match=match):
      eval_run.make_evaluator(config, info, str(tmp_path), mesh1)

  refused(("bpd_iwae",), r"metrics \['bpd_iwae'\] need a latent-variable bound.*"
                         r"config.task='diffusion' run without one", bound=None)
  config.eval.iwae_samples = 0
  refused(("bpd_elbo",), "config.eval.iwae_samples=0 must be >= 1")
  refused(("psnr", "rfd"), r"metrics \['psnr', 'rfd'\] need an encoder and a decoder "
                           r"\(the `autoencoder` capability\)", autoencoder=None)
  refused(("lpips",), "metric lpips needs LPIPS weights: config.eval.lpips_weights")
  config.eval.lpips_weights = "unused.npz"
  refused(("lpips",), "at least 16×16.*'sklearn_digits' has 8×8×1")
  refused(("rfd",), "metric rfd needs a feature network: config.eval.feature_workdir")
  refused(("fd",), r"metrics \['fd'\]: .* which generates nothing")
