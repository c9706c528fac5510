"""diffusion_jax: a pure-JAX library and launcher for generative image models."""
__version__ = "0.1.0"
