"""Textual inversion (Gal et al. 2022) on the digits: one new token <v> (id 259, the
tokenizer's first placeholder) whose embedding alone is learned from five 9s captioned
"a handwritten <v>", "the digit <v>", ...; the denoiser and the text encoder are
frozen. It starts from the mean embedding of the word "digit"'s tokens. Base runs as in
configs/digits_finetune.py:

  diffusion-jax-train --config=configs/digits_textual_inversion.py --workdir=/tmp/ft_ti \
      --config.text.clip_workdir=/tmp/clip_no9 --config.init.from_workdir=/tmp/t2i_no9
  diffusion-jax-sample --workdir=/tmp/t2i_no9 --adapter=/tmp/ft_ti/adapters/400.safetensors \
      --prompt="a handwritten <v>" --output=/tmp/v.npz --grid
"""
from diffusion_jax_configs import common, digits_t2i

TEMPLATES = ("a photo of the digit <v>", "a handwritten <v>", "the number <v>",
             "a drawing of the digit <v>", "an image of a <v>", "<v>", "the digit <v>",
             "a scan of a handwritten <v>")


def get_config():
  c = digits_t2i.get_config()
  common.few_digits(c, label=9, count=5)
  c.text.templates = TEMPLATES
  common.finetuning(c, "finetune", method="textual_inversion", num_steps=400, lr=5e-3)
  c.finetune.placeholders = 1
  c.finetune.initializer = "digit"
  return c
