"""DreamBooth with LoRA instead of every weight: rank-4 adapters on the U-Net's
attention projections (finetune.lora_targets), the base frozen, prior preservation as
configs/digits_dreambooth.py (same commands, this config). The adapters alone are
written beside each checkpoint, <workdir>/adapters/<step>.safetensors, and load onto
the base run:

  diffusion-jax-sample --workdir=/tmp/t2i_no9 --adapter=/tmp/ft_db_lora/adapters/300.safetensors \
      --prompt="a sks digit" --output=/tmp/sks.npz --grid
"""
from diffusion_jax_configs import common, digits_dreambooth


def get_config():
  c = digits_dreambooth.get_config()
  common.finetuning(c, "finetune", method="lora", num_steps=300, lr=2e-3)
  c.finetune.lora_rank = 4
  return c
