"""Consistency distillation on CIFAR-10 (Song, Dhariwal, Chen & Sutskever 2023, Table 3
and the official `consistency_models_cifar10` configs/cifar10_ve_cd.py): the EDM path
(σ ∈ [0.002, 80], EDM preconditioning) and its ρ = 7 grid of N = 18 points, the
teacher's Heun step, batch 512, Adam at 4e-4 (constant; CM used RAdam, whose
rectification the 1,000 warm-up steps stand in for), no gradient clipping, student EMA
0.9999, 800k steps, θ⁻ = stopgrad(θ) (μ = 0: the official CIFAR-10 CD code; CM's
ImageNet-64 / LSUN runs used μ = 0.95, --config.consistency.target_decay=0.95). The
distance is iCT's pseudo-Huber (c = 0.00054·√3072); CM's LPIPS is
--config.consistency.distance=lpips --config.consistency.lpips_weights=lpips_vgg16.npz
(nets/lpips.py; inputs upsampled to 224×224). The network is this library's U-Net at
the size of configs/cifar10_ddpm.py (CM distils EDM's NCSN++), unconditional.
An accelerator recipe; the teacher is this config's own diffusion model:

  tfds build cifar10 --file_format=array_record            # on a machine with internet
  diffusion-jax-train --config=configs/cifar10_consistency.py --workdir=/ckpt/edm \
      --config.task=diffusion --config.sample.sampler=edm --config.sample.num_steps=18 \
      --config.data.data_dir=<tfds dir>
  diffusion-jax-train --config=configs/cifar10_consistency.py --workdir=/ckpt/cd \
      --config.distill.teacher=/ckpt/edm --config.data.data_dir=<tfds dir>

Consistency training instead (no teacher; iCT's settings):
  --config.consistency.mode=training --config.consistency.schedule=ict
  --config.consistency.weighting=ict --config.consistency.time_sampling=lognormal
  --config.distill.init=random --config.optim.lr=1e-4 --config.model.dropout=0.3
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.data.update(name="cifar10", batch_size=512, random_flip=True, num_threads=8)
  c.model.channels = 128
  c.model.channel_mult = (1, 2, 2, 2)
  c.model.num_res_blocks = 2
  c.model.attn_resolutions = (16,)
  c.model.num_heads = 1
  c.model.dropout = 0.0
  c.model.class_conditional = False       # CM's CIFAR-10 models are unconditional
  c.diffusion.update(path="edm", prediction="edm", loss_weight="edm", sigma_min=0.002,
                     sigma_max=80.0, rho=7.0, sigma_data=0.5)
  c.task = "consistency"
  c.consistency.update(mode="distillation", num_scales=18, solver="heun", target_decay=0.0,
                       distance="pseudo_huber", sigma_min=0.002, sigma_max=80.0, rho=7.0,
                       sigma_data=0.5)
  c.sample.update(sampler="consistency", num_steps=1, guidance=0.0)
  c.optim.update(name="adam", lr=4e-4, schedule="constant", warmup_steps=1000, grad_clip=0.0)
  c.train.update(num_steps=800_000, log_every=100, checkpoint_every=10_000,
                 sample_every=10_000, ema_decay=0.9999)
  return c
