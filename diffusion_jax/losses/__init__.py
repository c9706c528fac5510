"""Pure loss functions beside the diffusion loss (which stays in diffusion/losses.py):
`contrastive` (CLIP softmax, SigLIP sigmoid, retrieval accuracy) and `gan` (minimax,
non-saturating, hinge, LSGAN, WGAN; WGAN-GP and R1 penalties). Plain jax.numpy."""
from diffusion_jax.losses import contrastive, gan

__all__ = ["contrastive", "gan"]
