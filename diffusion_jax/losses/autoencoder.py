"""The losses of the latent autoencoder (Esser et al. 2021, "Taming Transformers",
Eq. 7; Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", Appendix G), beside the adversarial losses of `losses/gan.py` and the KL of
`losses/vae.py`. Plain jax.numpy.

The autoencoder's objective per example (latent-diffusion's `LPIPSWithDiscriminator`):

    L = L_rec + w_kl·KL(q(z|x) ‖ N(0, I)) + [step ≥ s]·w_d·λ·L_adv,
    L_rec = Σ_pixels (|x − x̂| + w_p·LPIPS(x, x̂)),        (l1; l2: (x − x̂)²)
    L_adv = −mean D(x̂)                                   (hinge generator loss)

with the adaptive weight λ = ‖∇_{w_L} L_rec‖ / (‖∇_{w_L} L_adv‖ + δ) at the decoder's
last layer w_L (Esser et al. 2021, Eq. 7), clamped to [0, λ_max] and held constant
(no gradient flows through it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["RECONSTRUCTIONS", "adaptive_weight", "reconstruction"]

RECONSTRUCTIONS = ("l1", "l2")


def reconstruction(kind: str, x, x_hat):
  """Σ over every non-batch axis of |x − x̂| (l1) or (x − x̂)² (l2) → [B] float32."""
  if kind not in RECONSTRUCTIONS:
    raise ValueError(f"config.autoencoder.reconstruction={kind!r}: expected one of "
                     f"{list(RECONSTRUCTIONS)}")
  d = (x - x_hat).astype(jnp.float32)
  d = jnp.abs(d) if kind == "l1" else d * d
  return jnp.sum(d.reshape(d.shape[0], -1), axis=1)


def adaptive_weight(rec_grad, adv_grad, delta: float = 1e-4, max_weight: float = 1e4):
  """λ = ‖g_rec‖₂ / (‖g_adv‖₂ + δ), clamped to [0, max_weight] and stop-gradient'ed:
  g_rec, g_adv are the gradients of the reconstruction (NLL) and adversarial losses
  with respect to the same weights (the decoder's last layer; pytrees allowed).
  Esser et al. 2021, Eq. 7; latent-diffusion's `calculate_adaptive_weight`."""
  norm = lambda t: jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                                for g in jax.tree.leaves(t)))
  lam = norm(rec_grad) / (norm(adv_grad) + delta)
  return jax.lax.stop_gradient(jnp.clip(lam, 0.0, max_weight))
