"""Guidance distillation of the quickstart (Meng et al. 2023, stage one): a student that
takes the CFG weight w as an input and samples in one network call per step what the
quickstart's classifier-free guidance does in two (half the NFE at the same sampler and
steps). The teacher is a finished quickstart run; the student is its U-Net with a w
embedding (model.guidance_input), initialised from it, trained on w ~ U[0, 4].

  diffusion-jax-train --config=quickstart --workdir=/tmp/quickstart
  diffusion-jax-train --config=digits_guidance_distillation --workdir=/tmp/guided \
      --config.distill.teacher=/tmp/quickstart
  diffusion-jax-sample --workdir=/tmp/guided --guidance=2 --output=/tmp/guided.npz --grid

Stage two (fewer steps) is configs/digits_guided_progressive.py with this run as teacher.
The measured cost and quality are in docs/distillation.md.
"""
from diffusion_jax_configs import quickstart


def get_config():
  c = quickstart.get_config()  # the teacher's network, path, data and sampler
  c.task = "guidance_distillation"
  c.model.guidance_input = True
  c.guidance_distillation.update(w_min=0.0, w_max=4.0)
  c.distill.teacher = ""  # --config.distill.teacher=<the quickstart run's workdir>
  c.optim.update(lr=1e-3, warmup_steps=50)
  c.train.update(num_steps=1500, log_every=100, checkpoint_every=500)
  return c
