"""The latent autoencoder of latent diffusion (Rombach et al. 2022) on the embedded
5,000 MNIST digits: 28×28×1 → 7×7×4 latents (f = 4), trained with L1 reconstruction,
a KL weight of 1e-6 and, from step `autoencoder.disc_start`, a hinge PatchGAN with the
adaptive weight (Esser et al. 2021, Eq. 7). LPIPS is off by default (it needs a weights
file, docs/autoencoders.md): add `--config.autoencoder.perceptual_weight=1.0
--config.autoencoder.lpips_weights=lpips_vgg16.npz` (28×28 images are upsampled by
nothing: VGG sees them as they are).

  diffusion-jax-train --config=mnist5k_autoencoder --workdir=/tmp/mnist5k_ae
  diffusion-jax-evaluate --workdir=/tmp/mnist5k_ae --config.eval.metrics=psnr,ssim
  diffusion-jax-encode --autoencoder=/tmp/mnist5k_ae --dataset=mnist5k \\
      --output_dir=/tmp/tfds/mnist5k_latents

Measured (2-core CPU, 404 s): held-out PSNR 26.28 dB, SSIM 0.944 (docs/benchmarks.md,
"Latent diffusion pipeline").
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.mnist5k_data(base(), batch_size=32)
  common.latent_autoencoder(c, channels=(16, 32, 32), latent_channels=4, disc_start=800)
  c.optim.update(name="adam", lr=1e-3, b1=0.5, b2=0.9, schedule="constant", warmup_steps=50)
  c.train.update(num_steps=1200, log_every=100, checkpoint_every=600, ema_decay=0.999)
  c.eval.metrics = ("psnr", "ssim")
  c.eval.num_samples = 1000
  return c
