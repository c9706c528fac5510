"""absl entry points; installed as `diffusion_jax_launch` (see pyproject.toml)."""
