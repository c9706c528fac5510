"""A noise-conditional classifier p(y | x_t, t) on the embedded 8×8 digits, on the
quickstart's path (rectified flow), for classifier guidance:

  diffusion-jax-train --config=configs/digits_classifier.py --workdir=/tmp/digits_cls
  diffusion-jax-sample --workdir=/tmp/quickstart_uncond --classifier_workdir=/tmp/digits_cls \
      --classifier_scale=2 --labels=0,1,2 --num_samples=30 --output=/tmp/guided.npz

t is drawn uniformly (guidance queries the classifier at every t of the sampler), not
logit-normal as the denoiser's training does. With --config.classifier.noise_conditional=False
it is a clean-image classifier instead.
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.digits_data(base())
  c.task = "classifier"
  common.digits_unet(c)
  c.diffusion.path = "flow"
  c.diffusion.time_sampling = "uniform"  # guidance asks at every t, not logit-normal ones
  common.quickstart_training(c, num_steps=1000)
  return c
