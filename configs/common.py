"""Building blocks of the shipped configs: each sets one coherent group of keys on a
config (from `diffusion_jax.config.base()`) and returns it, so a config file reads as
base + blocks + only what differs (configs/quickstart.py is four blocks; a config
imports them as `from diffusion_jax_configs import common`, in a checkout and installed).

A block sets its keys and nothing else: a key it does not name keeps the base default
(or what an earlier block set). Keys are in docs/configs.md.
"""


# ---- data

def digits_data(c, batch_size=128):
  """The embedded 8×8 sklearn digits (1,797 images, 10 classes)."""
  c.data.name = "sklearn_digits"
  c.data.batch_size = batch_size
  return c


def mnist5k_data(c, batch_size=64):
  """The embedded 5,000-image MNIST subset (28×28, 10 classes)."""
  c.data.name = "mnist5k"
  c.data.batch_size = batch_size
  return c


# ---- networks

def digits_unet(c, channels=16):
  """The quickstart's small U-Net for 8×8 images: two levels (8×8, 4×4), one residual
  block each, self-attention at 4×4."""
  c.model.channels = channels
  c.model.channel_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  return c


def mnist5k_unet(c):
  """A three-level U-Net for 28×28 images (28, 14, 7), 32 channels, one residual block
  per level, self-attention at 7×7."""
  c.model.channels = 32
  c.model.channel_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (7,)
  return c


def dcgan(c, channels, latent_dim):
  """The GAN task with DCGAN generator and discriminator (Radford et al. 2016; projection
  discriminator and conditional BatchNorm when `model.class_conditional`) and the
  non-saturating loss."""
  c.task = "gan"
  c.gan.generator = "dcgan"
  c.gan.discriminator = "dcgan"
  c.gan.channels = channels
  c.gan.latent_dim = latent_dim
  c.gan.loss = "non_saturating"
  return c


def latent_autoencoder(c, channels, latent_channels, disc_start, disc_weight=0.5):
  """The latent autoencoder task (Rombach et al. 2022): block_out_channels `channels`
  (f = 2^(len − 1)), one ResNet block per level, `latent_channels`, L1 reconstruction,
  KL weight 1e-6, a hinge PatchGAN (2 strided layers, no normalisation) with the
  adaptive weight from step `disc_start`."""
  c.task = "autoencoder"
  c.model.class_conditional = False
  c.autoencoder.update(channels=tuple(channels), layers_per_block=1,
                       latent_channels=latent_channels, norm_groups=8, reconstruction="l1",
                       kl_weight=1e-6, disc_weight=disc_weight, disc_start=disc_start)
  c.gan.update(discriminator="patchgan", patch_layers=2, channels=32, d_norm="none",
               loss="hinge")
  return c


# ---- objective and sampling

def rectified_flow(c, sample_steps, guidance=1.0):
  """The quickstart's objective: rectified flow (linear path, velocity prediction,
  logit-normal t as in Esser et al. 2024), sampled with Euler steps and CFG weight w."""
  c.diffusion.path = "flow"
  c.diffusion.prediction = "velocity"
  c.diffusion.time_sampling = "logit_normal"
  c.sample.sampler = "euler"
  c.sample.num_steps = sample_steps
  c.sample.guidance = guidance
  return c


def ddpm(c, beta_schedule):
  """DDPM's objective (Ho et al. 2020): the discrete VP path with T = 1000 steps,
  ε-prediction at discrete t, `beta_schedule` ('linear', or Nichol & Dhariwal's
  'cosine'); samplers clip x̂₀ to [-1, 1]. The sampler is the config's choice."""
  c.diffusion.path = "vp_discrete"
  c.diffusion.prediction = "eps"
  c.diffusion.num_steps = 1000
  c.diffusion.beta_schedule = beta_schedule
  c.diffusion.time_sampling = "discrete"
  c.sample.clip_x0 = True
  return c


# ---- optimisation and training length

def quickstart_training(c, num_steps=600, checkpoint_every=500):
  """The quickstart's CPU recipe for 8×8 digits: AdamW at 2e-3 after 100 warm-up steps
  (cosine decay), EMA 0.995, a log line every 100 steps."""
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.train.num_steps = num_steps
  c.train.log_every = 100
  c.train.checkpoint_every = checkpoint_every
  c.train.ema_decay = 0.995
  return c


def dcgan_adam(c, lr=2e-4):
  """DCGAN's optimiser (Radford et al. 2016): Adam with β₁ = 0.5 at a constant learning
  rate (2e-4), no warm-up and no gradient clipping; both players."""
  c.optim.name = "adam"
  c.optim.lr = lr
  c.optim.b1 = 0.5
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip = 0.0
  return c


# ---- fine-tuning (docs/finetuning.md)

DIGITS_BUT_NINE = (0, 1, 2, 3, 4, 5, 6, 7, 8)


def few_digits(c, label=9, count=5, batch_size=10):
  """Fine-tuning data: the first `count` training digits of class `label` of the
  embedded digits (data.labels, data.max_examples), repeated, `batch_size` per step."""
  c.data.labels = (label,)
  c.data.max_examples = count
  c.data.batch_size = batch_size
  return c


def finetuning(c, task, method="lora", num_steps=300, lr=1e-3):
  """Start from the base run named by --config.init.from_workdir: its network under
  'denoiser' for the finetune task (config.init.map), the task's own new entries
  (adapters, embeddings, the text encoder) initialised fresh; constant lr without
  weight decay (frozen rows of a table must not decay), EMA 0.99, a checkpoint (and
  adapter file) at the end."""
  c.task = task
  if task == "finetune":
    c.finetune.method = method
    c.init.map = (("^", "denoiser/"),)
    c.init.rules = (("^(lora|embeddings|text)(/|$)", "init"),)
  c.optim.update(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0)
  c.train.update(num_steps=num_steps, log_every=50, checkpoint_every=num_steps,
                 ema_decay=0.99)
  c.sample.per_class = 8
  return c
