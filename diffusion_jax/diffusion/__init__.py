"""The mathematics of Gaussian diffusion and flows, in plain jax.numpy (no Flax)."""
from diffusion_jax.diffusion import losses, paths, predictions, time_sampling
from diffusion_jax.diffusion.paths import Path

__all__ = ["Path", "losses", "paths", "predictions", "time_sampling"]
