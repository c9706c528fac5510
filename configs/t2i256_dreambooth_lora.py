r"""DreamBooth with LoRA (Ruiz et al. 2023; Hu et al. 2021) of a text-to-image latent DiT
at 256×256: the accelerator recipe, with the defaults of diffusers'
examples/dreambooth/train_dreambooth_lora.py.

The base is a caption-conditioned DiT-XL/2 (PixArt-α-style cross-attention to a clip run's
text encoder, Chen et al. 2024) on the 32×32×4 latents of the Stable Diffusion
autoencoder (preset `sd`, scale 0.18215), rectified flow; any run with these `model`,
`diffusion`, `text` and `latent` sections is a base (checked at start, naming every key
that differs). The fine-tuning: rank-4 LoRA (α = r, Gaussian A, B = 0) on every attention
projection (q, kv, qkv, proj), the base frozen; the instance images captioned "a photo of
sks dog" as the first half of each batch, class images the base drew for "a photo of
dog" as the second (prior preservation, λ = 1; 100 class images); AdamW lr 5e-4 with a
500-step linear warm-up then constant, weight decay 1e-2, β = (0.9, 0.999), ε = 1e-8,
gradient clipping at 1.0; batch 4 + 4 (diffusers' per-device train_batch_size 4 with its
class half); 500 steps, a checkpoint and adapter file at the end. Images are encoded in
the step (a few images: no latent cache), center-cropped to 256² (diffusers: 512², random
crops). bf16 compute, float32 parameters.

  # instance images: a folder of PNG/JPEG files, one caption for all
  diffusion-jax-images --input=/data/dog --caption="a photo of sks dog" \
      --image_size=256 --output=/data/sks_dog
  # class images, drawn once by the base model (diffusers: num_class_images = 100)
  diffusion-jax-sample --workdir=/runs/t2i256 --num_samples=100 \
      --prompt="a photo of dog" --output=/data/class_dog.npz
  diffusion-jax-images --input=/data/class_dog.npz --caption="a photo of dog" \
      --output=/data/class_dog
  diffusion-jax-train --config=t2i256_dreambooth_lora --workdir=/runs/sks_dog \
      --config.init.from_workdir=/runs/t2i256 --config.text.clip_workdir=/runs/clip \
      --config.latent.autoencoder=/weights/sd-vae-ft-ema.safetensors
  diffusion-jax-sample --workdir=/runs/t2i256 --prompt="a photo of sks dog on the beach" \
      --adapter=/runs/sks_dog/adapters/500.safetensors --output=/tmp/sks.npz --grid

Not measured on an accelerator yet.
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common

INSTANCE_DATA = "/data/sks_dog"  # diffusion-jax-images --output (the instance images)
CLASS_DATA = "/data/class_dog"   # diffusion-jax-images --output (the class images)


def base_network(c):
  """The base run's network and what it denoises: what a 256² text-to-image base of
  this recipe is trained with (its own config sets these, plus its data and length)."""
  c.model.name = "dit"
  c.model.update(variant="XL/2", class_conditional=False, text_attention="cross",
                 dtype="bfloat16", param_dtype="float32", scan=False)
  c.text.encoder = "clip"
  c.text.max_length = 77
  c.latent.update(preset="sd", scale=0.18215, shift=0.0)
  common.rectified_flow(c, sample_steps=32, guidance=4.0)
  return c


def get_config():
  c = base_network(base())
  c.data.update(name=INSTANCE_DATA, paired_name=CLASS_DATA, batch_size=8, image_size=256,
                num_threads=4)
  c.latent.autoencoder = "/weights/sd-vae-ft-ema.safetensors"
  c.diffusion.prior_weight = 1.0
  c.diffusion.label_dropout = 0.0  # diffusers' DreamBooth drops no captions
  common.finetuning(c, "finetune", method="lora", num_steps=500, lr=5e-4)
  c.finetune.update(lora_rank=4, lora_alpha=None, lora_dropout=0.0)
  c.optim.update(warmup_steps=500, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8,
                 grad_clip=1.0)
  c.train.update(checkpoint_every=500, ema_decay=0.999)
  c.sample.per_class = 0
  return c
