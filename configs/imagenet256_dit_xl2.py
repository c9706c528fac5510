r"""DiT-XL/2 on ImageNet 256×256 (Peebles & Xie 2023): the paper's accelerator recipe.

A class-conditional Diffusion Transformer (adaLN-Zero, hidden 1152, depth 28, 16
heads, patch 2: 256 tokens; 675M parameters) on the 32×32×4 latents of the Stable
Diffusion autoencoder (Rombach et al. 2022; DiT uses its fine-tuned decoders
`sd-vae-ft-ema` / `sd-vae-ft-mse`, same architecture: preset `sd`, latents scaled by
0.18215) of 256×256 ImageNet (TFDS `imagenet2012`, center-cropped, random horizontal
flips). The paper's training settings (§4): DDPM's discrete VP path with linear β
from 1e-4 to 0.02, T = 1000 (Ho et al. 2020), ε-prediction with the simple loss,
class labels dropped to ∅ with p = 0.1 for classifier-free guidance (Ho & Salimans
2022), AdamW at a constant lr 1e-4 with no weight decay, no warm-up and no gradient
clipping, batch 256, EMA 0.9999; 400K steps (the paper's model comparisons; its best
XL/2 trained 7M). bf16 compute, float32 parameters and optimizer state.

Not the paper: DiT also learns the reverse-process covariance Σ (an 8-channel output,
the variational-bound term of Nichol & Dhariwal 2021); this repository's DiT predicts
ε only (4 output channels, 18K fewer parameters) and samples with a fixed variance
(DDPM ancestral, β̃_t, 250 respaced steps as the paper's sampler). Images are
center-cropped then resized once (bicubic), not ADM's repeated box downsampling.
Guidance: w = 0.5 here is the paper's scale s = 1.5 (s = 1 + w; its FID-50K setting;
its showcase samples use s = 4, --guidance=3).

The pipeline (array_record TFDS data; `imagenet2012` needs its manual download,
ILSVRC2012_img_train.tar / _val.tar in --manual_dir):

  tfds build imagenet2012 --file_format=array_record --manual_dir=/data/imagenet \
      --data_dir=/data/tfds
  # 1. encode the train split once: posteriors of every image and of its flip
  #    (float32: 4 × 16 KiB per image, ≈ 78 GiB; resumable, multi-host).
  diffusion-jax-encode --autoencoder=/weights/sd-vae-ft-ema.safetensors --preset=sd \
      --dataset=imagenet2012 --data_dir=/data/tfds --split=train --image_size=256 \
      --flips --batch_size=256 --output_dir=/data/latents/imagenet256_sd
  # 2. train on the cache (data.name below is its --output_dir)
  diffusion-jax-train --config=imagenet256_dit_xl2 --workdir=/runs/dit_xl2 \
      --config.data.name=/data/latents/imagenet256_sd
  # 3. sample: 250 DDPM steps with CFG, decoded by the cache's autoencoder to 256² RGB
  diffusion-jax-sample --workdir=/runs/dit_xl2 --output=/tmp/dit_xl2.npz --grid \
      --num_samples=64 --labels=207,360,387,974,88,979,417,279
  # throughput (images/s, MFU) on an accelerator, without the cache:
  python launch/benchmark_train.py --config=configs/imagenet256_dit_xl2.py \
      --synthetic=32,32,4 --steps=20

The latents come from the cache: config.latent.autoencoder and .preset stay empty (the
cache records the autoencoder it was encoded with and decodes samples with it); the
scale is pinned to SD's 0.18215 (the cache's measured 1/std would be used otherwise).
Encoding in the step instead (--config.data.name=imagenet2012
--config.data.image_size=256 --config.latent.autoencoder=<the .safetensors>
--config.latent.preset=sd) runs the SD encoder on every image every step.

model.scan stays False so that `benchmark_train`'s FLOPs (XLA counts a scan body once)
and MFU are right; at batch 256 on one device the activations may need
`--config.model.remat=dots_no_batch` (a compute-only key: a run may resume with it).
No training-time sample grids (1000 classes); sample with diffusion-jax-sample.
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common

# The latent cache written by step 1 above (its --output_dir): the one line to change.
LATENT_CACHE = "/data/latents/imagenet256_sd"


def get_config():
  c = base()
  c.data.update(name=LATENT_CACHE, batch_size=256, random_flip=True, num_threads=8)
  c.latent.update(scale=0.18215, shift=0.0)
  c.model.name = "dit"
  c.model.update(variant="XL/2", class_conditional=True, dtype="bfloat16",
                 param_dtype="float32", scan=False)
  common.ddpm(c, beta_schedule="linear")
  c.diffusion.label_dropout = 0.1
  c.sample.update(sampler="ddpm", num_steps=250, guidance=0.5, clip_x0=False, per_class=0)
  c.optim.update(name="adamw", lr=1e-4, weight_decay=0.0, schedule="constant",
                 warmup_steps=0, grad_clip=0.0)
  c.train.update(num_steps=400_000, log_every=100, checkpoint_every=50_000,
                 sample_every=0, ema_decay=0.9999)
  return c
