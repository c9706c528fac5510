"""Pure loss functions beside the diffusion loss (which stays in diffusion/losses.py)."""
from diffusion_jax.losses import contrastive

__all__ = ["contrastive"]
