"""Sample-quality metrics on feature vectors: Fréchet distance, KID, Inception Score,
precision/recall. Plain numpy in float64 (the sums that matter are done on the host).

Features stream in batches: `Moments` accumulates the count, sum and sum of outer
products in float64 (Fréchet distance needs only these), so no image is kept; KID and
precision/recall need the feature vectors themselves (N × D floats, not images).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Moments:
  """Streaming first and second moments of feature vectors, in float64."""
  n: int
  total: np.ndarray   # [D]   Σ f
  outer: np.ndarray   # [D,D] Σ f fᵀ

  @classmethod
  def zeros(cls, dim: int) -> "Moments":
    return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

  def update(self, features) -> "Moments":
    """Adds a batch [B, D]; returns self."""
    f = np.asarray(features, np.float64)
    self.n += f.shape[0]
    self.total += f.sum(0)
    self.outer += f.T @ f
    return self

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    """(μ [D], Σ [D,D]) with the unbiased (N − 1) covariance, as the FID tools use."""
    if self.n < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n}")
    mu = self.total / self.n
    cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, cov

  def state(self) -> dict:
    return {"n": np.asarray(self.n), "total": self.total, "outer": self.outer}

  @classmethod
  def from_state(cls, s) -> "Moments":
    return cls(int(s["n"]), np.asarray(s["total"], np.float64), np.asarray(s["outer"], np.float64))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^{1/2}) (Heusel et al. 2017), the Fréchet (W₂)
  distance of two Gaussians. Tr (Σ₁Σ₂)^{1/2} = Σ √λᵢ over the eigenvalues of the
  symmetric PSD matrix Σ₁^{1/2} Σ₂ Σ₁^{1/2} (eigh, float64; tiny negative round-off
  eigenvalues are clipped to 0), which avoids the complex sqrtm of the FID tools."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"feature statistics differ in shape: {mu1.shape}/{s1.shape} vs "
                     f"{mu2.shape}/{s2.shape}")
  w, v = np.linalg.eigh((s1 + s1.T) / 2)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root1 @ s2 @ root1
  lam = np.linalg.eigvalsh((m + m.T) / 2)
  tr_sqrt = np.sum(np.sqrt(np.clip(lam, 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _poly_kernel(x, y):
  """k(x, y) = (xᵀy/d + 1)³, KID's kernel (Bińkowski et al. 2018)."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
  """The unbiased estimate of MMD² with KID's kernel between samples x [m, D], y [n, D]:
  mean_{i≠j} k(xᵢ,xⱼ) + mean_{i≠j} k(yᵢ,yⱼ) − 2·mean k(xᵢ,yⱼ)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m, n = len(x), len(y)
  kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kid(real, fake, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0):
  """Kernel Inception Distance: the mean (and std) over `num_subsets` random subsets of
  size min(subset_size, len) of the unbiased MMD² — unbiased, so it can be < 0."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  size = min(subset_size, len(real), len(fake))
  if size < 2:
    raise ValueError("KID needs at least 2 real and 2 generated feature vectors")
  rng = np.random.default_rng(seed)
  vals = [mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                        fake[rng.choice(len(fake), size, replace=False)])
          for _ in range(num_subsets)]
  return float(np.mean(vals)), float(np.std(vals))


def inception_score(logits, num_splits: int = 10):
  """exp(E_x KL(p(y|x) ‖ p(y))) (Salimans et al. 2016) from classifier logits [N, C]:
  mean and std over `num_splits` equal splits, p(y) estimated per split."""
  logits = np.asarray(logits, np.float64)
  logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
  scores = []
  for part in np.array_split(logp, num_splits):
    p = np.exp(part)
    log_marginal = np.log(p.mean(0))
    scores.append(np.exp(np.mean(np.sum(p * (part - log_marginal), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a, b):
  return np.maximum(np.sum(a ** 2, 1)[:, None] + np.sum(b ** 2, 1)[None] - 2 * a @ b.T, 0.0)


def _knn_radii(x, k: int, block: int = 4096):
  """Squared distance of each point of x to its k-th nearest other point."""
  radii = np.empty(len(x))
  for i in range(0, len(x), block):
    d = _sq_dists(x[i:i + block], x)
    radii[i:i + block] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
  return radii


def _coverage(points, centres, radii, block: int = 4096):
  """Fraction of points inside at least one ball (centre, radius²)."""
  inside = np.zeros(len(points), bool)
  for i in range(0, len(points), block):
    inside[i:i + block] = np.any(_sq_dists(points[i:i + block], centres) <= radii[None], axis=1)
  return float(inside.mean())


def precision_recall(real, fake, k: int = 3):
  """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the
  union of balls around its points reaching their k-th nearest neighbour; precision is
  the fraction of generated points inside the real manifold, recall the fraction of
  real points inside the generated one."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision/recall with k={k} needs more than {k} points per set")
  precision = _coverage(fake, real, _knn_radii(real, k))
  recall = _coverage(real, fake, _knn_radii(fake, k))
  return precision, recall


def psnr(x, y, data_range: float = 2.0):
  """Peak signal-to-noise ratio per image [N] in dB, 10·log₁₀(range²/MSE), for images
  [N, H, W, C] (range 2 for [-1, 1]); identical images give +inf."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  mse = np.mean((x - y) ** 2, axis=tuple(range(1, x.ndim)))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5):
  g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
  return g / g.sum()


def _filter_valid(x, w):
  """Separable 'valid' filtering of [N, H, W, C] with the 1-D window w along H and W."""
  k = len(w)
  h = sum(w[i] * x[:, i:x.shape[1] - k + 1 + i] for i in range(k))
  return sum(w[i] * h[:, :, i:h.shape[2] - k + 1 + i] for i in range(k))


def ssim(x, y, data_range: float = 2.0, window: int = 11, sigma: float = 1.5):
  """Structural similarity per image [N] (Wang et al. 2004): the mean over valid
  Gaussian windows (11×11, σ = 1.5) and channels of
      (2μₓμᵧ + C₁)(2σₓᵧ + C₂) / ((μₓ² + μᵧ² + C₁)(σₓ² + σᵧ² + C₂)),
  C₁ = (0.01·L)², C₂ = (0.03·L)². Images smaller than the window use a window of
  their size (odd), σ scaled with it."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  size = min(window, x.shape[1], x.shape[2])
  size -= 1 - size % 2
  w = _gaussian_window(size, sigma * size / window)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mx, my = _filter_valid(x, w), _filter_valid(y, w)
  sxx = _filter_valid(x * x, w) - mx ** 2
  syy = _filter_valid(y * y, w) - my ** 2
  sxy = _filter_valid(x * y, w) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
  return s.mean(axis=(1, 2, 3))


def mode_coverage(points, centres, std: float, min_count: int = 20):
  """Mode coverage of a generator of a Gaussian mixture with known modes (the 2-D ring
  and grid benchmarks; Srivastava et al. 2017, Lin et al. 2018): a sample is
  *high quality* when within 3·std of its nearest centre; a mode is *covered* when it
  has at least min_count high-quality samples (PacGAN's protocol: 20 of 2,500).

  points [N, D], centres [M, D] → {"modes": covered count, "high_quality": fraction of
  samples, "counts": high-quality samples per mode [M], "kl": KL(mode histogram ‖
  uniform) of the high-quality samples}."""
  points = np.asarray(points, np.float64).reshape(len(points), -1)
  centres = np.asarray(centres, np.float64)
  d2 = _sq_dists(points, centres)
  nearest = np.argmin(d2, axis=1)
  good = np.sqrt(d2[np.arange(len(points)), nearest]) <= 3 * std
  counts = np.bincount(nearest[good], minlength=len(centres))
  p = counts / max(counts.sum(), 1)
  kl = float(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) * len(centres)), 0.0)))
  return {"modes": int(np.sum(counts >= min_count)), "high_quality": float(good.mean()),
          "counts": counts.tolist(), "kl": kl}
