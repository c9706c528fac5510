r"""Guidance distillation on class-conditional ImageNet 64×64 (Meng et al. 2023, "On
Distillation of Guided Diffusion Models", stage one, the pixel-space ImageNet 64×64
setting): the accelerator recipe.

The network is ADM's ImageNet-64 U-Net (Dhariwal & Nichol 2021; the sizes of
tests/nets/test_unet.py::test_adm_imagenet64_config_builds: 192 channels, mult
(1, 2, 3, 4), 3 residual blocks per level, attention at 32, 16 and 8 with 64-channel
heads, BigGAN up/down-sampling blocks, AdaGN, dropout 0.1; ≈ 296M parameters) with 1000
classes + ∅, and for the student the w embedding (model.guidance_input: sinusoidal
features of w, an MLP, added to the time embedding, Meng et al. §4.1). The student
learns w ~ U[0, 4] (the paper's range), starts from the teacher's parameters (its w
embedding zero: exactly the teacher's conditional model), and regresses onto the
teacher's (1 + w)·f(y) − w·f(∅) in v space (docs/distillation.md).

The path is the continuous cosine VP schedule with v-prediction, the parametrisation
progressive distillation needs (Salimans & Ho 2022 §4: ε-prediction is unstable at few
steps), so that stage two (config.task='progressive' from this run, `launch/progressive.py`)
applies unchanged. Not the paper's: this library's ADM-sized U-Net, its cosine VP path
and optimiser settings; images are TFDS `imagenet2012` center-cropped and resized once
to 64×64 (ADM box-downsamples).

  tfds build imagenet2012 --file_format=array_record --manual_dir=/data/imagenet \
      --data_dir=/data/tfds
  # 1. the teacher: this config as a plain CFG diffusion model (p(∅) = 0.1)
  diffusion-jax-train --config=imagenet64_guidance_distillation --workdir=/runs/in64 \
      --config.task=diffusion --config.model.guidance_input=False \
      --config.optim.lr=1e-4 --config.train.num_steps=500000 --config.data.data_dir=/data/tfds
  # 2. the student (stage one)
  diffusion-jax-train --config=imagenet64_guidance_distillation --workdir=/runs/in64_w \
      --config.distill.teacher=/runs/in64 --config.data.data_dir=/data/tfds
  # 3. sample at any w in [0, 4]: one network call per step (the teacher's CFG: two)
  diffusion-jax-sample --workdir=/runs/in64_w --guidance=2 --steps=64 --sampler=ddim \
      --output=/tmp/in64_w.npz --grid --num_samples=64 --labels=207,360,387,974,88,979,417,279

bf16 compute, float32 parameters; `--config.model.remat=dots_no_batch` (compute-only: a
run may resume with it) if the activations of batch 512 do not fit. No training-time
sample grids (1000 classes).
"""
from diffusion_jax.config import base


def get_config():
  c = base()
  c.task = "guidance_distillation"
  c.data.update(name="imagenet2012", image_size=64, batch_size=512, random_flip=True,
                num_threads=8)
  c.model.update(channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                 attn_resolutions=(32, 16, 8), num_head_channels=64, resblock_updown=True,
                 scale_shift_norm=True, dropout=0.1, class_conditional=True,
                 guidance_input=True, dtype="bfloat16", param_dtype="float32")
  c.diffusion.update(path="vp_cosine", prediction="v", time_sampling="uniform",
                     loss_weight="uniform", label_dropout=0.1)
  c.guidance_distillation.update(w_min=0.0, w_max=4.0)
  c.distill.teacher = ""  # --config.distill.teacher=<the teacher run's workdir>
  c.sample.update(sampler="ddim", num_steps=64, guidance=2.0, per_class=0)
  c.optim.update(name="adamw", lr=3e-5, weight_decay=0.0, schedule="constant",
                 warmup_steps=1000, grad_clip=1.0)
  c.train.update(num_steps=50_000, log_every=100, checkpoint_every=5_000, sample_every=0,
                 ema_decay=0.9999)
  return c
