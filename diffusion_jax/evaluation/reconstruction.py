"""Reconstruction metrics of an autoencoder (the `Autoencoder` capability: a VAE, the
latent autoencoder of latent diffusion): held-out images x, their reconstructions
x̂ = decode(μ(x)) through the posterior mean μ of q(z|x) (no latent sampling, so the
numbers are deterministic), compared per image and in distribution.

    psnr   10·log₁₀(2²/MSE(x, x̂)) dB on [-1, 1], per image (`metrics.psnr`)
    ssim   Wang et al. 2004, 11×11 Gaussian window σ = 1.5, per image (`metrics.ssim`)
    lpips  LPIPS-VGG (Zhang et al. 2018; `nets.lpips`), per image
    rfd    ‖μ_x − μ_x̂‖² + Tr(Σ_x + Σ_x̂ − 2(Σ_xΣ_x̂)^{1/2}) (Heusel et al. 2017) between
           the feature-network features of the N originals and of their N
           reconstructions (`rfd_<network>`, the reconstruction FID of Rombach et
           al. 2022, Tab. 8, in this project's feature spaces)

Per-image numbers are reported as mean and standard error over the images. Images are
read batch by batch (a split through `data.pipeline.Arrays`, each host its devices'
rows) and go through one compiled call per batch (reconstruction, LPIPS and the
features), sharded over every device; only x and x̂ of that batch (for PSNR and SSIM,
computed on the host in float64) and the features (into float64 moments) come back.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from diffusion_jax import parallel
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import metrics as metrics_lib
from diffusion_jax.nets import lpips as lpips_lib

__all__ = ["METRICS", "reconstruct", "reconstruction_metrics"]

METRICS = ("psnr", "ssim", "lpips", "rfd")


def reconstruct(autoencoder, params, x, labels):
  """x̂ = decode(μ(x)) [B, *image_shape]: the decoder's mean at the posterior mean of
  x [B, *image_shape] in [-1, 1] (labels [B], used when `autoencoder.conditional`)."""
  labels = labels if autoencoder.conditional else None
  mean, _ = autoencoder.encode(params, x, labels)
  return autoencoder.decode(params, mean, labels)


def reconstruction_metrics(autoencoder, params, images, labels, mesh, *,
                           metrics: Sequence[str], nets: Sequence[Any] = (),
                           lpips_variables=None, batch: int = 256, stop=None) -> dict:
  """Reconstruction metrics of `autoencoder` (with `params`) on images [N, H, W, C] in
  [-1, 1] (numpy) with labels [N], or on a split read batch by batch
  (`data.pipeline.Arrays`, labels None): for each of `metrics` (a subset of METRICS;
  see the module docstring) `<m>` and `<m>_stderr` (psnr, ssim, lpips),
  `rfd_<net.name>` for each feature network of `nets` (`run.FeatureNet`), and
  `reconstruction_images` N.
  lpips needs `lpips_variables` (`nets.lpips.load`), rfd at least one of `nets`.
  Numbers are float64 means over images, independent of `batch` and the devices.
  stop: called before every batch (the evaluator's; it raises to abandon the work)."""
  metrics = tuple(metrics)
  unknown = sorted(set(metrics) - set(METRICS))
  if unknown:
    raise ValueError(f"unknown reconstruction metrics {unknown}; expected some of {list(METRICS)}")
  if "lpips" in metrics and lpips_variables is None:
    raise ValueError("metric lpips needs LPIPS weights: config.eval.lpips_weights")
  if "rfd" in metrics and not nets:
    raise ValueError("metric rfd needs a feature network: config.eval.feature_workdir "
                     "and/or config.eval.inception_weights")
  arrays = images if isinstance(images, pipeline.Arrays) else pipeline.Arrays.of(images, labels)
  if tuple(arrays.image_shape) != tuple(autoencoder.image_shape):
    raise ValueError(f"the autoencoder takes {tuple(autoencoder.image_shape)} images; the "
                     f"evaluation images are {tuple(arrays.image_shape)}")
  nets = tuple(nets) if "rfd" in metrics else ()
  f_params = {net.name: net.params for net in nets}

  def one_batch(params, f_params, lp, x, y):
    x_hat = reconstruct(autoencoder, params, x, y).astype(x.dtype)
    out = {"x_hat": x_hat}
    if lp is not None:
      out["lpips"] = lpips_lib.lpips(lp, x, x_hat)
    for net in nets:
      both = net.image(f_params[net.name], jax.numpy.concatenate([x, x_hat]))[1]
      out[f"{net.name}_real"], out[f"{net.name}_recon"] = jax.numpy.split(both, 2)
    return out

  fn = jax.jit(one_batch)
  lp = lpips_variables if "lpips" in metrics else None
  per_image = {m: [] for m in ("psnr", "ssim", "lpips") if m in metrics}
  moments = {}   # {"<net>_real" / "<net>_recon": float64 Moments of its features}
  for i, count, b in arrays.sharded_batches(batch, mesh):
    if stop is not None:
      stop()
    out = fn(params, f_params, lp, b["image"], b["label"])
    out = {k: parallel.to_host(v)[:count] for k, v in out.items()}
    x_hat = out.pop("x_hat")
    if not np.all(np.isfinite(x_hat)):
      raise FloatingPointError(f"non-finite reconstructions of images {i}..{i + count - 1}")
    if "psnr" in per_image or "ssim" in per_image:
      x = parallel.to_host(b["image"])[:count]
    if "psnr" in per_image:
      per_image["psnr"].append(metrics_lib.psnr(x, x_hat))
    if "ssim" in per_image:
      per_image["ssim"].append(metrics_lib.ssim(x, x_hat))
    if "lpips" in per_image:
      per_image["lpips"].append(out.pop("lpips").astype(np.float64))
    for net in nets:
      for k in (f"{net.name}_real", f"{net.name}_recon"):
        moments.setdefault(k, metrics_lib.Moments.zeros(out[k].shape[1])).update(out[k])

  results = {"reconstruction_images": len(arrays)}
  for m, values in per_image.items():
    v = np.concatenate(values)
    results[m] = float(np.mean(v))
    with np.errstate(invalid="ignore"):   # perfect reconstructions: PSNR +inf
      results[m + "_stderr"] = float(np.std(v) / np.sqrt(len(v)))
  for net in nets:
    stats = [moments[f"{net.name}_{kind}"].mean_cov() for kind in ("real", "recon")]
    results[f"rfd_{net.name}"] = metrics_lib.frechet_distance(*stats[0], *stats[1])
  return results
