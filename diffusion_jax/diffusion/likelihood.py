"""Likelihoods of Gaussian-path diffusion models: the DDPM variational bound and the
probability-flow ODE log-likelihood. Units are nats per example unless a name says
bits/dim; `bits_per_dim` divides by D·ln 2.

Variational bound (Ho et al. 2020, eq. 5; Kingma et al. VDM 2021, eq. 4–5) on a time
grid 0 = t_0 < t_1 < … < t_T = 1, with the model's reverse step
p(x_s | x_t) = q(x_s | x_t, x₀ = x̂₀(x_t, t)) (the posterior of any Gaussian path, see
`posterior`):

    −log p(x₀) ≤ L_T + Σ_{k=2..T} L_{k−1} + L_0,
    L_T     = KL(q(x_1 | x₀) ‖ N(0, I))                              (`prior_kl`)
    L_{k−1} = E_q KL(q(x_{t_{k−1}} | x_{t_k}, x₀) ‖ p(x_{t_{k−1}} | x_{t_k}))
    L_0     = E_q −log p(x₀ | x_{t_1})                               (decoder)

The decoder is DDPM's discretised Gaussian for 8-bit data in [−1, 1]
(`discretized_gaussian_log_likelihood`) or a plain Gaussian for continuous data; with
the Gaussian decoder the model is a density on R^D, so the bound holds for continuous
data (and its data average is ≥ the data's differential entropy).

Probability-flow ODE (Song et al. 2021, "Score-based generative modeling through
SDEs", App. D): dx/dt = v(x, t) = a'(t)·x̂₀ + b'(t)·ε̂ transports p_t, and
d log p_t(x_t)/dt = −div v, so

    log p_ε(x) = log N(x_1; 0, I) + ∫_ε^1 div v(x_t, t) dt,   x_ε = x.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

LOG_2PI = math.log(2.0 * math.pi)


def _bcast(v, x):
  """Scalar or per-example [B] value → broadcastable against x [B, ...]."""
  v = jnp.asarray(v, x.dtype)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _sum_dims(v):
  """[B, ...] → [B]: sum over everything but the batch axis."""
  return jnp.sum(v.reshape(v.shape[0], -1), axis=1)


def _example_keys(key, batch: int):
  """One key per example, fold_in(key, index): an example's randomness does not
  depend on the batch size."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def bits_per_dim(nats, num_dims: int):
  """nats per example → bits per dimension: nats / (D·ln 2)."""
  return nats / (num_dims * math.log(2.0))


# ----------------------------------------------------------------------------------
# Gaussian pieces.


def transition(path, t, s):
  """(a_{t|s}, σ²_{t|s}) of q(x_t | x_s) = N(a_{t|s}·x_s, σ²_{t|s}) for s < t:
  a_{t|s} = a_t/a_s, σ²_{t|s} = b_t² − a_{t|s}²·b_s² (VDM eq. 19–20). t, s scalar or [B]."""
  a_t, b_t = path.ab(t)
  a_s, b_s = path.ab(s)
  a_ts = a_t / a_s
  # Clamp: float32 cancellation can make tiny variances slightly negative.
  return a_ts, jnp.maximum(b_t ** 2 - a_ts ** 2 * b_s ** 2, 0.0)


def posterior(path, x0, x_t, t, s):
  """(mean, var) of q(x_s | x_t, x₀) for s < t, any Gaussian path.

      μ  = a_{t|s}·b_s²/b_t² · x_t + a_s·σ²_{t|s}/b_t² · x₀,   σ̃² = σ²_{t|s}·b_s²/b_t²

  (VDM App. A; on the discrete VP grid with s = t − 1/T this is DDPM eq. 6–7:
  μ̃ = √ᾱ_{t−1}β_t/(1−ᾱ_t)·x₀ + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t, β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t).
  x0, x_t: [B, ...]; t, s: scalars or [B]. Returns mean [B, ...] and var broadcast to it.
  """
  a_ts, var_ts = transition(path, t, s)
  _, b_t = path.ab(t)
  a_s, b_s = path.ab(s)
  coef_xt = _bcast(a_ts * b_s ** 2 / b_t ** 2, x_t)
  coef_x0 = _bcast(a_s * var_ts / b_t ** 2, x0)
  mean = coef_xt * x_t + coef_x0 * x0
  var = jnp.broadcast_to(_bcast(var_ts * b_s ** 2 / b_t ** 2, x_t), mean.shape)
  return mean, var


def gaussian_kl(mean1, var1, mean2, var2):
  """Elementwise KL(N(mean1, var1) ‖ N(mean2, var2)) in nats:
  ½·(log var2 − log var1 + (var1 + (mean1 − mean2)²)/var2 − 1)."""
  return 0.5 * (jnp.log(var2) - jnp.log(var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def gaussian_log_prob(x, mean, var):
  """Elementwise log N(x; mean, var)."""
  return -0.5 * (LOG_2PI + jnp.log(var) + (x - mean) ** 2 / var)


def prior_kl(path, x0):
  """L_T = KL(q(x_1 | x₀) ‖ N(0, I)) = Σ_i KL(N(a_1·x₀ᵢ, b_1²) ‖ N(0, 1)), [B] nats.
  Zero for the flow path (a_1 = 0, b_1 = 1)."""
  a1, b1 = path.ab(1.0)
  kl = gaussian_kl(a1 * x0, jnp.broadcast_to(b1 ** 2, x0.shape), 0.0, 1.0)
  return _sum_dims(kl)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """Elementwise log P(x) of 8-bit data x = n/127.5 − 1 ∈ [−1, 1] under a Gaussian
  N(mean, exp(log_scale)²) integrated over x's bin (Ho et al. 2020, §3.3; Nichol &
  Dhariwal 2021): bins [x − 1/255, x + 1/255] of width 2/255, the edge bins open
  (x = −1 takes (−∞, −1 + 1/255], x = 1 takes [1 − 1/255, ∞)), so the 256 bins'
  probabilities sum to one. All arguments broadcast; returns log-probabilities.
  """
  inv_std = jnp.exp(-log_scale)
  plus = (x - mean + 1.0 / 255.0) * inv_std
  minus = (x - mean - 1.0 / 255.0) * inv_std
  log_cdf_plus = log_ndtr(plus)
  log_sf_minus = log_ndtr(-minus)  # log(1 − Φ(minus)), accurate in the right tail
  # Φ(plus) − Φ(minus) loses everything when both lie in the same tail; there use the
  # complement tail (symmetry) and, if the bin is still below float resolution, the
  # midpoint rule pdf·width (as PixelCNN++ does).
  delta = jnp.where(minus > 0, ndtr(-minus) - ndtr(-plus), ndtr(plus) - ndtr(minus))
  log_mid = (-0.5 * (LOG_2PI + ((x - mean) * inv_std) ** 2) - log_scale
             + math.log(2.0 / 255.0))
  log_delta = jnp.where(delta > 1e-6, jnp.log(jnp.maximum(delta, 1e-30)), log_mid)
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_sf_minus, log_delta))


# ----------------------------------------------------------------------------------
# The variational bound.


def vlb_grid(path, num_steps: int | None = None):
  """t_0 = 0 < t_1 < … < t_T = 1, uniform (snapped to a discrete path's grid).
  num_steps defaults to a discrete path's T; the flow path needs it."""
  if num_steps is None:
    if not path.discrete:
      raise ValueError("vlb: num_steps is required for continuous path "
                       f"{path.kind!r}")
    num_steps = path.num_steps
  if num_steps < 1:
    raise ValueError(f"vlb: num_steps={num_steps} must be >= 1")
  if path.discrete and num_steps > path.num_steps:
    raise ValueError(f"vlb: num_steps={num_steps} exceeds the path's "
                     f"{path.num_steps} discrete steps")
  return path.snap(jnp.linspace(0.0, 1.0, num_steps + 1))


def geometric_grid(num_steps: int, t_min: float = 1e-3):
  """t_0 = 0, t_k = t_min^{(T−k)/(T−1)} for k = 1..T (t_1 = t_min, t_T = 1), [T+1].

  Why: the bound's discretisation gap per step grows with the SNR ratio
  SNR(t_{k−1})/SNR(t_k) (VDM §3.3–4); on the flow path SNR ≈ 1/t² near 0, so a uniform
  grid keeps the first ratio ≈ 4 for every T and the bound never tightens. A geometric
  grid is ≈ uniform in log-SNR near the data end, the ratios → 1 and the bound
  converges to the continuous-time bound as T grows. Continuous paths only."""
  if num_steps < 2:
    raise ValueError(f"geometric_grid: num_steps={num_steps} must be >= 2")
  k = jnp.arange(1, num_steps + 1)
  t = jnp.asarray(t_min, jnp.float32) ** ((num_steps - k) / (num_steps - 1))
  return jnp.concatenate([jnp.zeros((1,)), t.astype(jnp.float32)])


def _step_nll(path, model_x0_fn, x0, grid, k, z, decoder, variance, decoder_var):
  """The k-th term (k [B] in 1..T) for noise z [B, ...]: L_{k−1} for k ≥ 2, the
  decoder's −log p(x₀ | x_{t_1}) for k = 1. Returns (kl [B], decoder_nll [B])."""
  t, s = grid[k], grid[k - 1]
  a_t, b_t = path.ab(t)
  x_t = _bcast(a_t, x0) * x0 + _bcast(b_t, z) * z
  x0_hat = model_x0_fn(x_t, t)
  is_dec = k == 1
  # s = t_0 = 0 makes q(x_s | x_t, x₀) a point mass; give that (unused) branch a
  # finite variance so neither value nor gradient of the where is NaN.
  s_safe = jnp.where(is_dec, grid[1] / 2, s)
  mean_q, var_q = posterior(path, x0, x_t, t, s_safe)
  mean_p, var_p = posterior(path, x0_hat, x_t, t, s_safe)
  if variance == "large":  # DDPM's σ_t² = β_t
    var_p = jnp.broadcast_to(_bcast(transition(path, t, s_safe)[1], x0), x0.shape)
  kl = _sum_dims(gaussian_kl(mean_q, var_q, mean_p, var_p))
  # Decoder variance in data units: 1/SNR(t_1) = b²/a², the noise level of x_{t_1}/a.
  dvar = b_t ** 2 / a_t ** 2 if decoder_var is None else jnp.asarray(decoder_var)
  dvar = jnp.broadcast_to(_bcast(dvar, x0), x0.shape)
  if decoder == "discrete":
    ll = discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * jnp.log(dvar))
  else:
    ll = gaussian_log_prob(x0, x0_hat, dvar)
  return jnp.where(is_dec, 0.0, kl), jnp.where(is_dec, -_sum_dims(ll), 0.0)


def vlb_terms(path, model_x0_fn, x0, key, *, num_steps: int | None = None,
              grid=None, exact: bool = True, decoder: str = "discrete", variance: str = "small",
              decoder_var=None):
  """The DDPM bound per example, in nats: dict(prior, diffusion, decoder, total) [B].

  model_x0_fn(x_t [B, ...], t [B]) -> x̂₀ [B, ...]. The reverse step is
  p(x_s | x_t) = N(μ̃(x_t, x̂₀), σ²) with σ² = σ̃² ('small', the posterior variance) or
  σ²_{t|s} ('large'); the decoder p(x₀ | x_{t_1}) has mean x̂₀(x_{t_1}, t_1) and
  variance `decoder_var` (default 1/SNR(t_1) = b²/a² at t_1), discretised over 8-bit
  bins ('discrete', x0 = n/127.5 − 1) or continuous ('gaussian').

  The grid is `grid` [T+1] (0 = t_0 < … < t_T = 1, e.g. `geometric_grid`) if given,
  else `vlb_grid(path, num_steps)`: a discrete path's own T steps by default.

  exact=True sums all T terms (one x_t draw per term, `lax.scan` over the grid):
  cost T model calls. exact=False is the unbiased one-term estimate (Ho et al. 2020,
  §3.3; Nichol & Dhariwal 2021): k ~ U{1..T} per example and T·L_{k−1} (k = 1 is the
  decoder term), cost one model call. Both are unbiased for the bound; their
  expectation over data is ≥ the data's cross-entropy under the model.
  """
  if decoder not in ("discrete", "gaussian"):
    raise ValueError(f"vlb: decoder={decoder!r}: expected 'discrete' or 'gaussian'")
  if variance not in ("small", "large"):
    raise ValueError(f"vlb: variance={variance!r}: expected 'small' or 'large'")
  grid = vlb_grid(path, num_steps) if grid is None else jnp.asarray(grid, jnp.float32)
  T = grid.shape[0] - 1
  B = x0.shape[0]
  keys = _example_keys(key, B)
  noise = lambda j: jax.vmap(lambda kk: jax.random.normal(
      jax.random.fold_in(kk, j), x0.shape[1:], x0.dtype))(keys)
  term = lambda k, z: _step_nll(path, model_x0_fn, x0, grid, k, z, decoder, variance,
                                decoder_var)

  if exact:
    def body(carry, k):
      kl, dec = term(jnp.full((B,), k), noise(k))
      return (carry[0] + kl, carry[1] + dec), None
    zeros = jnp.zeros((B,), x0.dtype)
    (diffusion, dec_nll), _ = jax.lax.scan(body, (zeros, zeros), jnp.arange(1, T + 1))
  else:
    # Only the diffusion terms are sampled, k ~ U{2..T} and (T−1)·L_{k−1}; the decoder
    # term is computed exactly. Why: with a continuous decoder L_0 is O(−D·log SNR(t_1))
    # while the KLs are O(D), so sampling it too (T·L_0 with probability 1/T) makes
    # the estimate heavy-tailed. Step j's noise is fold_in(key_i, j), j = 1..T; j = 0
    # and T + 1 are free for the estimate's noise and time.
    _, dec_nll = term(jnp.ones((B,), jnp.int32), noise(1))
    if T > 1:
      k = jax.vmap(lambda kk: jax.random.randint(
          jax.random.fold_in(kk, T + 1), (), 2, T + 1))(keys)
      kl, _ = term(k, noise(0))
      diffusion = (T - 1) * kl
    else:
      diffusion = jnp.zeros((B,), x0.dtype)
  prior = prior_kl(path, x0)
  return dict(prior=prior, diffusion=diffusion, decoder=dec_nll,
              total=prior + diffusion + dec_nll)


# ----------------------------------------------------------------------------------
# The probability-flow ODE.


def _velocity_fn(path, denoiser):
  def v(x, t):
    x0, eps = denoiser(x, t)
    da, db = path.ab_dot(t)
    return da * x0 + db * eps
  return v


def _divergence_exact(v, x, t):
  """(v(x, t), div v) with the full Jacobian diagonal: D Jacobian-vector products
  with basis vectors, shared by the batch (the Jacobian is block diagonal because the
  denoiser treats examples independently). Cost D model evaluations."""
  D = math.prod(x.shape[1:])

  def column(j):
    e = jnp.broadcast_to(jax.nn.one_hot(j, D, dtype=x.dtype).reshape(x.shape[1:]), x.shape)
    _, jv = jax.jvp(lambda y: v(y, t), (x,), (e,))
    return jv.reshape(x.shape[0], D)[:, j]

  div = jnp.sum(jax.vmap(column)(jnp.arange(D)), axis=0)
  return v(x, t), div


def _divergence_hutchinson(v, x, t, probe):
  """(v(x, t), zᵀ(∂v/∂x)z): Hutchinson's unbiased estimate, E_z zᵀJz = tr J for
  E[zzᵀ] = I, with one Jacobian-vector product."""
  out, jz = jax.jvp(lambda y: v(y, t), (x,), (probe,))
  return out, _sum_dims(probe * jz)


def pf_ode_nll(path, denoiser, x, key, num_steps: int = 100,
               exact_divergence: bool = False, *, eps: float = 1e-3,
               probe: str = "rademacher", method: str = "rk4"):
  """−log p(x) [B] in nats by the probability-flow ODE (Song et al. 2021, App. D).

  denoiser(x_t [B, ...], t scalar) -> (x̂₀, ε̂), as the samplers take it. Integrates
      dx/dt = a'(t)·x̂₀ + b'(t)·ε̂,   dℓ/dt = div v
  from t = eps (x_eps = x) to 1 with `num_steps` fixed steps of RK4 or Heun, and
  returns −(log N(x_1; 0, I) + ℓ(1)). It is the likelihood of x as a sample at t = eps,
  and it takes the prior as N(0, I): exact for the flow path, an approximation of
  q(x_1) for VP paths with small a_1.

  exact_divergence: trace of the Jacobian (D JVPs a step; small D only); otherwise
  Hutchinson's estimate with one probe per example ('rademacher' or 'gaussian'),
  fixed along the trajectory (so the estimate is that of one continuous trace), from
  `key`; unbiased for the log-density, not for its exponent.
  """
  if method not in ("rk4", "heun"):
    raise ValueError(f"pf_ode_nll: method={method!r}: expected 'rk4' or 'heun'")
  if probe not in ("rademacher", "gaussian"):
    raise ValueError(f"pf_ode_nll: probe={probe!r}: expected 'rademacher' or 'gaussian'")
  v = _velocity_fn(path, denoiser)
  if exact_divergence:
    dyn = lambda y, t: _divergence_exact(v, y, t)
  else:
    keys = _example_keys(key, x.shape[0])
    if probe == "rademacher":
      z = jax.vmap(lambda k: jax.random.rademacher(k, x.shape[1:], x.dtype))(keys)
    else:
      z = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(keys)
    dyn = lambda y, t: _divergence_hutchinson(v, y, t, z)

  h = (1.0 - eps) / num_steps

  def step(i, state):
    y, ell = state
    t = eps + i * h
    v1, d1 = dyn(y, t)
    if method == "heun":
      v2, d2 = dyn(y + h * v1, t + h)
      return y + h / 2 * (v1 + v2), ell + h / 2 * (d1 + d2)
    v2, d2 = dyn(y + h / 2 * v1, t + h / 2)
    v3, d3 = dyn(y + h / 2 * v2, t + h / 2)
    v4, d4 = dyn(y + h * v3, t + h)
    return (y + h / 6 * (v1 + 2 * v2 + 2 * v3 + v4),
            ell + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4))

  x1, ell = jax.lax.fori_loop(0, num_steps, step, (x, jnp.zeros((x.shape[0],), x.dtype)))
  log_prior = _sum_dims(gaussian_log_prob(x1, 0.0, 1.0))
  return -(log_prior + ell)


def dequantize(key, x):
  """Uniform dequantisation of 8-bit data x = n/127.5 − 1 (n ∈ {0..255}):
  x̃ = 2·(n + u)/256 − 1, u ~ U[0, 1)^D per example from fold_in(key, index), so
  x̃ ∈ [−1, 1) and each bin has width 2/256 (Song et al. 2021's convention)."""
  n = jnp.round((x + 1.0) * 127.5)
  keys = _example_keys(key, x.shape[0])
  u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype))(keys)
  return 2.0 * (n + u) / 256.0 - 1.0


def bits_per_dim_dequantized(path, denoiser, x, key, num_steps: int = 100,
                             exact_divergence: bool = False, **kwargs):
  """Bits/dim of 8-bit data x = n/127.5 − 1 [B, ...] under the PF-ODE model, [B].

  With y = n + u ∈ [0, 256)^D (unit bins) and x̃ = 2y/256 − 1 = y/128 − 1,
  p_y(y) = p_x(x̃)·(1/128)^D, and Jensen gives −log P(n) ≤ E_u[−log p_y(n + u)]. So

      bpd = (−log p_x(x̃) + D·log 128) / (D·ln 2) = NLL_x/(D·ln 2) + 7,

  an upper bound in expectation over u on the discrete model's bits/dim (Ho et al.
  2020 and Song et al. 2021 report this). kwargs go to `pf_ode_nll`.
  """
  k_u, k_ode = jax.random.split(key)
  D = math.prod(x.shape[1:])
  nll = pf_ode_nll(path, denoiser, dequantize(k_u, x), k_ode, num_steps,
                   exact_divergence, **kwargs)
  return bits_per_dim(nll + D * math.log(128.0), D)
