"""Guidance distillation (Meng et al. 2023, stage one) of configs/mnist5k_flow.py: its
U-Net with a w input (model.guidance_input), initialised from the teacher, trained on
w ~ U[0, 4] to reproduce the teacher's CFG in one network call.

  diffusion-jax-train --config=mnist5k_guidance_distillation --workdir=/tmp/guided_m5 \
      --config.distill.teacher=/tmp/mnist5k_flow
"""
from diffusion_jax_configs import mnist5k_flow


def get_config():
  c = mnist5k_flow.get_config()  # the teacher's network, path, data and sampler
  c.task = "guidance_distillation"
  c.model.guidance_input = True
  c.guidance_distillation.update(w_min=0.0, w_max=4.0)
  c.optim.update(lr=5e-4, warmup_steps=100)
  c.train.update(num_steps=5000, log_every=100, checkpoint_every=1000, sample_every=1000)
  return c
