r"""Adversarial diffusion distillation (Sauer et al. 2024) of the DiT-XL/2 ImageNet-256
latent model (configs/imagenet256_dit_xl2.py): an accelerator recipe.

The student is the teacher's DiT-XL/2 (initialised from it) on the same 32×32×4 SD
latent cache, sampled in 4 steps (τ ∈ {1, 0.75, 0.5, 0.25}: ADD's {1000, 750, 500, 250};
`consistency` sampling, 1–4 steps) without classifier-free guidance: the teacher's CFG
weight (its sample.guidance, w = 0.5, DiT's s = 1.5) is baked into the distillation
targets. ADD's losses (§3): the distillation loss with λ = 2.5 and the exponential
weighting c(t) = a_t = sqrt(ᾱ_t), plus the hinge adversarial loss with R1 on real data.

Not the paper: ADD's discriminator is a frozen DINOv2 ViT-S with trainable heads on
decoded pixels, conditioned on text (and image) embeddings; here it is a trainable DCGAN
discriminator (three strided convolutions 32 → 4, 128–512 channels, no normalisation)
on the scaled latents themselves, conditioned on the class by projection (Miyato &
Koyama 2018). Learning rates, R1 γ, EMA and the number of steps are this recipe's
choices, not measured.

  # the teacher: configs/imagenet256_dit_xl2.py trained on the cache (its docstring)
  diffusion-jax-train --config=imagenet256_adversarial_distillation \
      --workdir=/runs/dit_xl2_add --config.distill.teacher=/runs/dit_xl2 \
      --config.data.name=/data/latents/imagenet256_sd
  diffusion-jax-sample --workdir=/runs/dit_xl2_add --steps=1 --output=/tmp/add1.npz \
      --grid --num_samples=64 --labels=207,360,387,974,88,979,417,279

The DiT sections (model, diffusion, data, latent) are the teacher recipe's and must
stay equal to the teacher run's (checked when training starts).
"""
from diffusion_jax_configs import imagenet256_dit_xl2


def get_config():
  c = imagenet256_dit_xl2.get_config()
  c.task = "adversarial_distillation"
  c.distill.teacher = ""                  # --config.distill.teacher=<the DiT-XL/2 run>
  c.distill.guidance = None               # the teacher's sample.guidance (w = 0.5)
  c.sample.update(sampler="consistency", num_steps=4, guidance=0.0, per_class=0)
  c.adversarial.update(distill_weight=2.5, adversarial_weight=1.0, distill_weighting="a_t",
                       teacher_t_min=0.02, teacher_t_max=1.0)
  c.gan.update(discriminator="dcgan", channels=128, d_norm="none", loss="hinge",
               r1_weight=0.1, d_lr=1e-5, d_steps=1)
  c.optim.update(name="adamw", lr=1e-5, weight_decay=0.0, schedule="constant",
                 warmup_steps=0, grad_clip=1.0)
  c.train.update(num_steps=20_000, log_every=100, checkpoint_every=5_000, ema_decay=0.999)
  return c
