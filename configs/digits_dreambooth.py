"""DreamBooth (Ruiz et al. 2023) on the digits: every denoiser weight fine-tuned on five
9s captioned with a rare identifier, "a sks digit", plus the prior-preservation loss on
class images the base model drew for the class prompt "a digit" (the second half of
every batch, `data.paired_name`; λ = diffusion.prior_weight = 1). Base runs as in
configs/digits_finetune.py; the class images are made once:

  diffusion-jax-sample --workdir=/tmp/t2i_no9 --num_samples=100 --prompt="a digit" \
      --output=/tmp/class_digit.npz
  diffusion-jax-images --input=/tmp/class_digit.npz --caption="a digit" \
      --output=/tmp/class_digit
  diffusion-jax-train --config=configs/digits_dreambooth.py --workdir=/tmp/ft_db \
      --config.text.clip_workdir=/tmp/clip_no9 --config.init.from_workdir=/tmp/t2i_no9 \
      --config.data.paired_name=/tmp/class_digit

Without prior preservation: --config.data.paired_name=''.
"""
from diffusion_jax_configs import common, digits_t2i


def get_config():
  c = digits_t2i.get_config()
  common.few_digits(c, label=9, count=5)
  c.text.templates = ("a sks digit",)
  c.data.paired_name = ""  # the class images' dataset (diffusion-jax-images)
  c.diffusion.prior_weight = 1.0
  common.finetuning(c, "diffusion", num_steps=300, lr=2e-4)
  return c
