"""Stage two of guidance distillation (Meng et al. 2023 §4.2): progressive distillation
(Salimans & Ho 2022) of a guidance-distilled student (configs/digits_guidance_distillation.py),
which is this run's teacher. The teacher's 8 deterministic DDIM steps become the
student's 4; both get the same w ~ U[0, 4] per example (config.guidance_distillation),
so the student keeps its w input (model.guidance_input) and samples at any w in 4 NFE.

  diffusion-jax-train --config=digits_guided_progressive --workdir=/tmp/guided4 \
      --config.distill.teacher=/tmp/guided
  diffusion-jax-sample --workdir=/tmp/guided4 --guidance=1 --output=/tmp/guided4.npz --grid

Halving further (4 → 2 → 1) is a chain of such runs, each the next one's teacher
(`launch/progressive.py`).
"""
from diffusion_jax_configs import quickstart


def get_config():
  c = quickstart.get_config()  # the network, path and data of the whole chain
  c.task = "progressive"
  c.model.guidance_input = True  # the teacher's w input, kept
  c.guidance_distillation.update(w_min=0.0, w_max=4.0)  # the w both get
  c.distill.teacher = ""  # --config.distill.teacher=<the guidance-distilled run's workdir>
  c.sample.update(sampler="ddim", num_steps=4, guidance=1.0)  # w is an input here, not CFG
  c.sample.ddim.eta = 0.0
  c.optim.update(lr=5e-4, warmup_steps=50)
  c.train.update(num_steps=1000, log_every=100, checkpoint_every=500)
  return c
