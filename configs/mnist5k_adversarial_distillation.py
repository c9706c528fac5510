"""Adversarial diffusion distillation (Sauer et al. 2024) of configs/mnist5k_flow.py: a
4-step student (consistency sampling, 1–4 steps), ADD's distillation loss against the
teacher (its CFG weight w = 1 baked in) plus a hinge loss from a DCGAN projection
discriminator on the 28×28 digits, with R1 on the real ones.

  diffusion-jax-train --config=mnist5k_adversarial_distillation --workdir=/tmp/add_m5 \
      --config.distill.teacher=/tmp/mnist5k_flow
"""
from diffusion_jax_configs import digits_adversarial_distillation, mnist5k_flow


def get_config():
  c = mnist5k_flow.get_config()  # the teacher's network, path and data
  add = digits_adversarial_distillation.get_config()
  c.task = "adversarial_distillation"
  c.distill.guidance = 1.0
  c.sample.update(sampler="consistency", num_steps=4, guidance=0.0)
  c.adversarial.update(add.adversarial.to_dict())
  c.gan.update(discriminator="dcgan", channels=32, d_norm="none", loss="hinge",
               r1_weight=0.1, d_lr=1e-3)
  c.optim.update(add.optim.to_dict())
  c.train.update(num_steps=4000, log_every=100, checkpoint_every=1000, sample_every=1000,
                 ema_decay=0.999)
  return c
