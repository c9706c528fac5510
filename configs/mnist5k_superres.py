"""Super-resolution 14×14 → 28×28 on the embedded MNIST subset: the second stage of a
two-stage cascade (Ho et al. 2022). The U-Net sees the 14×14 image, upsampled, as extra
input channels; Gaussian conditioning augmentation (σ = 0.1) makes it robust to the
first stage's imperfect samples. About 6 s/step on a 2-core CPU: an accelerator job
(launch/measure_superres.sh measures the same stage at 8×8 on CPU).

  # stage 1: 14×14 class-conditional flow
  diffusion-jax-train --config=configs/mnist5k_flow.py --config.data.image_size=14 \
      --workdir=/tmp/mnist14
  # stage 2: this config
  diffusion-jax-train --config=configs/mnist5k_superres.py --workdir=/tmp/mnist_sr
  # the cascade: stage-1 samples (with their labels) condition stage 2
  diffusion-jax-sample --workdir=/tmp/mnist14 --num_samples=40 --output=/tmp/low.npz
  diffusion-jax-sample --workdir=/tmp/mnist_sr --input=/tmp/low.npz --num_samples=40 \
      --output=/tmp/high.npz --grid
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common


def get_config():
  c = common.mnist5k_data(base())
  c.superres.low_res = 14
  c.superres.noise_aug = 0.1
  common.mnist5k_unet(c)
  common.rectified_flow(c, sample_steps=50)
  c.optim.lr = 1e-3
  c.train.update(num_steps=10000, log_every=100, checkpoint_every=2000, sample_every=2000)
  return c
