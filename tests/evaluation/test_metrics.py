"""Sample-quality metrics against closed forms and hand-built point clouds."""
import numpy as np
import pytest
import scipy.linalg

from diffusion_jax.evaluation import metrics

RNG = np.random.default_rng(0)


def _random_spd(d, rng):
  a = rng.normal(size=(d, d))
  return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_commuting_closed_form():
  """Σ₁, Σ₂ with shared eigenvectors: FD = ‖Δμ‖² + Σᵢ(√aᵢ − √bᵢ)²."""
  q, _ = np.linalg.qr(RNG.normal(size=(5, 5)))
  a, b = RNG.uniform(0.1, 3, 5), RNG.uniform(0.1, 3, 5)
  mu1, mu2 = RNG.normal(size=5), RNG.normal(size=5)
  fd = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  np.testing.assert_allclose(fd, np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2),
                             rtol=1e-9)


def test_frechet_distance_general_matches_scipy_sqrtm():
  s1, s2 = _random_spd(6, RNG), _random_spd(6, RNG)
  mu1, mu2 = RNG.normal(size=6), RNG.normal(size=6)
  ref = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
         - 2 * np.real(np.trace(scipy.linalg.sqrtm(s1 @ s2))))
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-8)


def test_streamed_moments_equal_batch_statistics_and_self_distance_is_zero():
  f = RNG.normal(size=(1000, 8)) @ RNG.normal(size=(8, 8)) + 3.0
  m = metrics.Moments.zeros(8)
  for batch in np.array_split(f, 7):
    m.update(batch.astype(np.float32))
  mu, cov = m.mean_cov()
  np.testing.assert_allclose(mu, f.astype(np.float32).mean(0), rtol=1e-6)
  np.testing.assert_allclose(cov, np.cov(f.astype(np.float32), rowvar=False), rtol=1e-5, atol=1e-6)
  assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-8
  m2 = metrics.Moments.from_state(m.state())
  assert m2.n == m.n and np.array_equal(m2.outer, m.outer)


def _exact_mmd2(xs, p, ys, q):
  k = metrics._poly_kernel
  return p @ k(xs, xs) @ p + q @ k(ys, ys) @ q - 2 * p @ k(xs, ys) @ q


def test_kid_estimator_is_unbiased_on_known_discrete_distributions():
  """P, Q on a few support points: the population MMD² is an exact finite sum. The
  mean of the estimator over many small samples matches it; the biased V-statistic
  (which includes i = j terms) does not."""
  xs, ys = RNG.normal(size=(4, 3)), RNG.normal(size=(5, 3)) + 0.3
  p, q = np.array([0.1, 0.2, 0.3, 0.4]), np.full(5, 0.2)
  exact = _exact_mmd2(xs, p, ys, q)
  rng = np.random.default_rng(1)
  m, reps = 8, 4000
  est, biased = [], []
  for _ in range(reps):
    x, y = xs[rng.choice(4, m, p=p)], ys[rng.choice(5, m, p=q)]
    est.append(metrics.mmd2_unbiased(x, y))
    k = metrics._poly_kernel
    biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
  se = np.std(est) / np.sqrt(reps)
  assert abs(np.mean(est) - exact) < 4 * se, (np.mean(est), exact, se)
  assert abs(np.mean(biased) - exact) > 10 * se
  same = [metrics.mmd2_unbiased(xs[rng.choice(4, m, p=p)], xs[rng.choice(4, m, p=p)])
          for _ in range(reps)]
  assert abs(np.mean(same)) < 4 * np.std(same) / np.sqrt(reps)


def test_kid_subsets():
  a = RNG.normal(size=(300, 4))
  mean, std = metrics.kid(a, RNG.normal(size=(300, 4)) + 2.0, num_subsets=20, subset_size=100)
  near, _ = metrics.kid(a, RNG.normal(size=(300, 4)), num_subsets=20, subset_size=100)
  assert mean > 10 * abs(near) and std >= 0


def test_precision_recall_on_hand_built_clouds():
  """Real = two tight clusters; generated = one of them: precision 1, recall ½.
  Generated far away: precision 0."""
  a = RNG.normal(size=(200, 2)) * 0.1
  b = RNG.normal(size=(200, 2)) * 0.1 + 5.0
  real = np.concatenate([a, b])
  fake = RNG.normal(size=(200, 2)) * 0.1
  precision, recall = metrics.precision_recall(real, fake, k=3)
  assert precision > 0.95 and 0.45 < recall < 0.55
  precision, recall = metrics.precision_recall(real, fake + 20.0, k=3)
  assert precision == 0.0 and recall == 0.0
  with pytest.raises(ValueError, match="k=3"):
    metrics.precision_recall(real[:3], fake)


def test_inception_score_extremes():
  """Uniform predictions: IS = 1; confident and balanced over C classes: IS = C."""
  assert metrics.inception_score(np.zeros((100, 10)), num_splits=5)[0] == pytest.approx(1.0)
  confident = np.eye(10)[np.arange(100) % 10] * 50.0
  assert metrics.inception_score(confident, num_splits=5)[0] == pytest.approx(10.0, rel=1e-6)


def test_psnr_closed_form():
  x = np.zeros((2, 4, 4, 1))
  y = x + np.array([0.1, 0.2])[:, None, None, None]
  np.testing.assert_allclose(metrics.psnr(x, y), 10 * np.log10(4 / np.array([0.01, 0.04])))
  assert metrics.psnr(x, x)[0] == np.inf


def test_ssim_identity_closed_form_and_reference():
  """SSIM(x, x) = 1; two constant images leave only the luminance term; and equal to
  scikit-image's implementation (a test-only dependency) with the same window."""
  x = RNG.uniform(-1, 1, size=(3, 16, 16, 2))
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, rtol=1e-12)
  y = np.clip(x + 0.2 * RNG.normal(size=x.shape), -1, 1)
  s = metrics.ssim(x, y)
  assert np.all((s > 0) & (s < 1))
  # constant image vs constant image: only the luminance term remains
  a, b = np.full((1, 16, 16, 1), 0.2), np.full((1, 16, 16, 1), -0.3)
  c1 = (0.01 * 2) ** 2
  np.testing.assert_allclose(metrics.ssim(a, b), (2 * 0.2 * -0.3 + c1) / (0.04 + 0.09 + c1), rtol=1e-9)
  import skimage.metrics as skm
  ref = [skm.structural_similarity(x[i], y[i], data_range=2.0, channel_axis=-1,
                                   gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
         for i in range(3)]
  np.testing.assert_allclose(s, ref, rtol=1e-6)
