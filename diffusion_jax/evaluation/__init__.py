"""Evaluation: a layer above training (training never imports it).

`make_evaluator(config, info, workdir, mesh)` builds the evaluator of a run from its
config.eval (the training loop's periodic evaluation: `loop.train(make_evaluator=)`),
`evaluate(workdir, overrides=...)` evaluates a finished run (`diffusion-jax-evaluate`);
the metrics of `metrics.py` are plain numpy functions of features and images;
`reconstruction.py` scores an autoencoder's reconstructions.
"""
from diffusion_jax.evaluation.metrics import (
    Moments, frechet_distance, inception_score, kid, mmd2_unbiased, mode_coverage,
    precision_recall, psnr, ssim)
from diffusion_jax.evaluation.reconstruction import reconstruction_metrics
from diffusion_jax.evaluation.run import METRICS, bound_bits_per_dim, evaluate, make_evaluator

__all__ = ["METRICS", "Moments", "bound_bits_per_dim", "evaluate", "frechet_distance",
           "inception_score", "kid", "make_evaluator", "mmd2_unbiased", "mode_coverage",
           "precision_recall", "psnr", "reconstruction_metrics", "ssim"]
