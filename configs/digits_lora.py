"""LoRA on a class-conditional digits run (configs/quickstart.py's model): rank-4
adapters on the U-Net's attention projections plus the class-embedding table (a
trainable subset: only the rows of the labels in the batches get gradients, the rest
stay bit for bit), taught a class from five images. A base without the 9s:

  diffusion-jax-train --config=configs/quickstart.py --workdir=/tmp/qs_no9 \
      --config.data.labels='(0,1,2,3,4,5,6,7,8)'
  diffusion-jax-train --config=configs/digits_lora.py --workdir=/tmp/ft_lora \
      --config.init.from_workdir=/tmp/qs_no9
"""
from diffusion_jax_configs import common, quickstart


def get_config():
  c = quickstart.get_config()
  common.few_digits(c, label=9, count=5)
  common.finetuning(c, "finetune", method="lora", num_steps=300, lr=2e-3)
  c.optim.trainable = ("^lora/", "^denoiser/Embed_0/")
  return c
