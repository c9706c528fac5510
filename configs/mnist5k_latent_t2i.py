r"""Text-to-image latent diffusion (Rombach et al. 2022) on the embedded 5,000 MNIST
digits: a DiT (Peebles & Xie 2023) with patch size 1 on the 7×7×4 latents of the
configs/mnist5k_autoencoder.py run (49 tokens; hidden 128, depth 4, 4 heads), read from
its latent cache, conditioned only on captions ("a handwritten 7", "the number
seven", ...) by cross-attention to the frozen text encoder of a clip run plus its
pooled embedding (PixArt-α's cross-attention, Chen et al. 2024). Labels are not
embedded; caption dropout (p = diffusion.label_dropout) trains the empty-caption ∅ of
classifier-free guidance. The objective is the quickstart's rectified flow. Samples are
decoded to 28×28 by the cache's autoencoder.

  diffusion-jax-train --config=mnist5k_autoencoder --workdir=/tmp/mnist5k_ae
  diffusion-jax-encode --autoencoder=/tmp/mnist5k_ae --dataset=mnist5k \
      --output_dir=/tmp/tfds/mnist5k_latents
  diffusion-jax-train --config=digits_clip --workdir=/tmp/digits_clip
  diffusion-jax-train --config=mnist5k_latent_t2i --workdir=/tmp/mnist5k_latent_t2i \
      --config.text.clip_workdir=/tmp/digits_clip
  diffusion-jax-sample --workdir=/tmp/mnist5k_latent_t2i --output=/tmp/lt2i.npz --grid \
      --prompt="the number seven" --prompt="a handwritten 3"

The clip run only encodes captions, so the 8×8 digits' clip run serves: MNIST captions
are made from the labels with the same templates (its text.max_length, 32, must not be
exceeded). The latents' scale is the cache's measured 1/std (Rombach et al. 2022
§4.3.2; config.latent.scale overrides it). data.name is the cache's --output_dir, the
one line to change. Quality and speed: not measured yet.
"""
from diffusion_jax.config import base
from diffusion_jax_configs import common

# The latent cache of the mnist5k_autoencoder run (diffusion-jax-encode --output_dir).
LATENT_CACHE = "/tmp/tfds/mnist5k_latents"


def get_config():
  c = base()
  c.data.update(name=LATENT_CACHE, batch_size=64)
  c.model.name = "dit"
  c.model.update(hidden_size=128, depth=4, num_heads=4, patch_size=1, scan=False)
  c.model.class_conditional = False  # captions only: labels are not embedded
  c.model.text_attention = "cross"
  c.text.encoder = "clip"
  c.text.max_length = 32
  common.rectified_flow(c, sample_steps=32)
  c.optim.update(lr=1e-3, warmup_steps=100)
  c.train.update(num_steps=3000, log_every=100, checkpoint_every=1000, ema_decay=0.999)
  return c
