"""Pure loss functions beside the diffusion loss (which stays in diffusion/losses.py):
`contrastive` (CLIP softmax, SigLIP sigmoid, retrieval accuracy), `gan` (minimax,
non-saturating, hinge, LSGAN, WGAN; WGAN-GP and R1 penalties) and `vae` (the
reparameterised sample, the Gaussian KL, the decoder likelihoods, ELBO and IWAE) and
`autoencoder` (the latent autoencoder's reconstruction and adaptive GAN weight). Plain
jax.numpy."""
from diffusion_jax.losses import autoencoder, contrastive, gan, vae

__all__ = ["autoencoder", "contrastive", "gan", "vae"]
