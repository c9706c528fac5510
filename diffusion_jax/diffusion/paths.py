"""Gaussian probability paths x_t = a(t)·x + b(t)·z, t ∈ [0, 1] (0 = data, 1 = noise).

Every diffusion process here is an instance of one form, the Gaussian kernel
q(x_t | x_0) (Kingma et al. 2021, VDM eq. 1; Karras et al. 2022, EDM eq. 1 with
s(t)·x + s(t)σ(t)·z):

* flow (rectified flow):  a = 1 − t,  b = t.
* vp_discrete (DDPM), T steps: a = sqrt(ᾱ_i), b = sqrt(1 − ᾱ_i) at t = i/T with
  ᾱ_i = Π_{j≤i} (1 − β_j) and ᾱ_0 = 1; linear (Ho et al. 2020) or cosine (Nichol &
  Dhariwal 2021) betas. Between grid points a and b are interpolated linearly in t,
  so they are defined (and differentiable almost everywhere) for every t.
* vp_linear (score-SDE VP, Song et al. 2021): β(t) = β_min + t(β_max − β_min),
  ᾱ(t) = exp(−β_min t − ½(β_max − β_min) t²), a = sqrt(ᾱ), b = sqrt(1 − ᾱ).
* vp_cosine: the cosine schedule in continuous time, ᾱ(t) = f(t)/f(0),
  f(t) = cos²((t + s)/(1 + s)·π/2), s = 0.008.
* sub_vp (Song et al. 2021): a = sqrt(ᾱ(t)) of vp_linear, b = 1 − ᾱ(t).
* ve (NCSN / score-SDE VE): a = 1, b = σ_min (σ_max/σ_min)^t for t > 0, b(0) = 0.
* edm (Karras et al. 2022): a = 1, b = σ(t) = (σ_min^{1/ρ} + t (σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ
  for t > 0, b(0) = 0: uniform steps in t are EDM's ρ-spaced σ steps.

A `Path` is a frozen dataclass, hashable, so it can be closed over by jitted code.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("flow", "vp_discrete", "vp_linear", "vp_cosine", "sub_vp", "ve", "edm")
BETA_SCHEDULES = ("linear", "cosine")


def ddpm_betas(schedule: str, num_steps: int) -> np.ndarray:
  """β_1..β_T (float64 [T]) for DDPM's linear or the improved-DDPM cosine schedule."""
  if schedule == "linear":
    # Ho et al. use 1e-4..0.02 for T=1000; scale so other T keep about the same ᾱ_T
    # (improved DDPM), capped at 0.999 like the cosine schedule so tiny T stays valid.
    scale = 1000.0 / num_steps
    return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64), 0.999)
  if schedule == "cosine":
    s = 0.008
    f = lambda u: np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    alpha_bar = f(u) / f(0.0)
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
  raise ValueError(f"diffusion.beta_schedule={schedule!r}: expected one of {BETA_SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class Path:
  """A Gaussian path. `kind` selects the instance; the rest parameterise it."""
  kind: str = "flow"
  num_steps: int = 1000           # T, discrete paths only
  beta_schedule: str = "linear"   # discrete VP only
  beta_min: float = 0.1           # vp_linear, sub_vp
  beta_max: float = 20.0
  sigma_min: float = 0.01         # ve, edm
  sigma_max: float = 50.0
  rho: float = 7.0                # edm
  sigma_data: float = 0.5         # data std for EDM preconditioning (prediction='edm')

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"diffusion.path={self.kind!r}: expected one of {KINDS}")
    if self.kind == "vp_discrete":
      if self.num_steps < 1:
        raise ValueError(f"diffusion.num_steps={self.num_steps} must be >= 1")
      ddpm_betas(self.beta_schedule, 1)  # validates the name

  @property
  def discrete(self) -> bool:
    return self.kind == "vp_discrete"

  def alpha_bar_table(self) -> np.ndarray:
    """ᾱ_0..ᾱ_T (float64 [T+1]) with ᾱ_0 = 1 (discrete VP only)."""
    betas = ddpm_betas(self.beta_schedule, self.num_steps)
    return np.concatenate([[1.0], np.cumprod(1.0 - betas)])

  def ab(self, t):
    """(a(t), b(t)) for t of any shape."""
    t = jnp.asarray(t, jnp.float32)
    if self.kind == "flow":
      return 1.0 - t, t
    if self.kind in ("vp_linear", "sub_vp", "vp_cosine"):
      alpha_bar = self._alpha_bar(t)
      b = 1.0 - alpha_bar if self.kind == "sub_vp" else jnp.sqrt(1.0 - alpha_bar)
      return jnp.sqrt(alpha_bar), b
    if self.kind in ("ve", "edm"):
      if self.kind == "ve":
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
      else:
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigma = (lo + t * (hi - lo)) ** self.rho
      return jnp.ones_like(t), jnp.where(t > 0, sigma, 0.0)
    # a and b tables are computed in float64 (1 − ᾱ loses digits in float32 near t = 0)
    # and interpolated separately: exact on the grid.
    grid = jnp.linspace(0.0, 1.0, self.num_steps + 1)
    alpha_bar = self.alpha_bar_table()
    a_tab = jnp.asarray(np.sqrt(alpha_bar), jnp.float32)
    b_tab = jnp.asarray(np.sqrt(1.0 - alpha_bar), jnp.float32)
    return jnp.interp(t, grid, a_tab), jnp.interp(t, grid, b_tab)

  def _alpha_bar(self, t):
    """Continuous-time ᾱ(t) of vp_linear / sub_vp / vp_cosine."""
    if self.kind == "vp_cosine":
      s = 0.008
      f = lambda u: jnp.cos((u + s) / (1 + s) * math.pi / 2) ** 2
      return f(t) / f(0.0)
    return jnp.exp(-self.beta_min * t - 0.5 * (self.beta_max - self.beta_min) * t ** 2)

  def ab_dot(self, t):
    """(a'(t), b'(t)): time derivatives, by forward-mode differentiation of `ab`."""
    t = jnp.asarray(t, jnp.float32)
    _, (da, db) = jax.jvp(self.ab, (t,), (jnp.ones_like(t),))
    return da, db

  def snr(self, t):
    """Signal-to-noise ratio a(t)²/b(t)²."""
    a, b = self.ab(t)
    return a ** 2 / b ** 2

  def snap(self, t):
    """Rounds t to the path's time grid (identity for continuous paths)."""
    if not self.discrete:
      return t
    return jnp.round(t * self.num_steps) / self.num_steps


def from_config(cfg) -> Path:
  """`config.diffusion` → Path."""
  return Path(kind=cfg.path, num_steps=int(cfg.num_steps), beta_schedule=cfg.beta_schedule,
              beta_min=cfg.beta_min, beta_max=cfg.beta_max, sigma_min=cfg.sigma_min,
              sigma_max=cfg.sigma_max, rho=cfg.rho, sigma_data=cfg.sigma_data)
