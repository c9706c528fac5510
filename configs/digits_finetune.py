"""Plain fine-tuning of a text-to-image digits run on five images of a digit it never
saw (every denoiser weight trains; no prior preservation): the baseline of
docs/finetuning.md, prone to forgetting. The base holds out the 9s:

  diffusion-jax-train --config=configs/digits_clip.py --workdir=/tmp/clip_no9 \
      --config.data.labels='(0,1,2,3,4,5,6,7,8)'
  diffusion-jax-train --config=configs/digits_t2i.py --workdir=/tmp/t2i_no9 \
      --config.text.clip_workdir=/tmp/clip_no9 --config.data.labels='(0,1,2,3,4,5,6,7,8)'
  diffusion-jax-train --config=configs/digits_finetune.py --workdir=/tmp/ft_plain \
      --config.text.clip_workdir=/tmp/clip_no9 --config.init.from_workdir=/tmp/t2i_no9

The five 9s are captioned as every digit is ("a handwritten 9", "the number nine", ...).
"""
from diffusion_jax_configs import common, digits_t2i


def get_config():
  c = digits_t2i.get_config()
  common.few_digits(c, label=9, count=5)
  common.finetuning(c, "diffusion", num_steps=300, lr=2e-4)
  return c
