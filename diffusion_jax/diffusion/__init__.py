"""The mathematics of Gaussian diffusion and flows, in plain jax.numpy (no Flax).

    paths          Path: x_t = a(t)·x + b(t)·z (flow, DDPM, VP/sub-VP/VE SDEs, EDM);
                   paths.from_config(config.diffusion)
    predictions    targets c(t)·x + d(t)·z (x, ε, v, velocity, score, EDM) and the exact
                   conversions (to_x0_eps, velocity); loss weights
    time_sampling  t distributions of training
    losses         the denoising loss
    likelihood     posterior, the DDPM variational bound, PF-ODE NLL, bits/dim
    consistency    consistency models: the boundary parametrisation, the CD/CT losses,
                   the CT schedules, the distances
"""
from diffusion_jax.diffusion import (consistency, likelihood, losses, paths, predictions,
                                    time_sampling)
from diffusion_jax.diffusion.paths import Path

__all__ = ["Path", "consistency", "likelihood", "losses", "paths", "predictions", "time_sampling"]
