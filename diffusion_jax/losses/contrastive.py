"""Contrastive image–text losses over a batch of B matched pairs (CLIP, Radford et al.
2021; SigLIP, Zhai et al. 2023).

x_i, y_j: L2-normalised image and text embeddings [B, D]; pair (i, i) matches, every
(i, j ≠ i) is an in-batch negative.

CLIP (Radford et al. 2021), a symmetric softmax cross-entropy over the similarity matrix
with logits s_ij = τ · x_i·y_j (τ = exp(t), learned):

    L = ½ [ −1/B Σ_i log softmax_j(s_ij)[i]  −  1/B Σ_j log softmax_i(s_ij)[j] ]
          (image → text)                        (text → image)

SigLIP (Zhai et al. 2023, eq. 1), an independent binary decision per pair with logits
s_ij = τ · x_i·y_j + b and labels z_ij = 1 if i = j else −1, normalised by the batch
size as in the paper:

    L = −1/B Σ_i Σ_j log σ(z_ij · s_ij)

Data-parallel training computes these on the global batch: under `jit` with a sharded
batch the arrays here are global and XLA inserts the gathers; under `pmap` the caller
all-gathers the embeddings first (`training/tasks/clip.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def similarity_logits(img, txt, logit_scale, logit_bias=0.0):
  """s = logit_scale · img txtᵀ + logit_bias: [B_img, B_txt], float32."""
  img, txt = img.astype(jnp.float32), txt.astype(jnp.float32)
  return logit_scale * (img @ txt.T) + logit_bias


def clip_loss(img, txt, logit_scale):
  """CLIP's symmetric cross-entropy (module docstring) of img, txt [B, D]: a scalar."""
  logits = similarity_logits(img, txt, logit_scale)
  diag = jnp.diagonal(logits)
  i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
  t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
  return 0.5 * (i2t + t2i)


def siglip_loss(img, txt, logit_scale, logit_bias):
  """SigLIP's pairwise sigmoid loss (module docstring) of img, txt [B, D]: a scalar."""
  logits = similarity_logits(img, txt, logit_scale, logit_bias)
  z = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(z * logits)) / logits.shape[0]


def loss(kind: str, img, txt, logit_scale, logit_bias=0.0):
  """config.clip.loss ('clip' | 'siglip') → that loss of img, txt [B, D]."""
  if kind == "clip":
    return clip_loss(img, txt, logit_scale)
  if kind == "siglip":
    return siglip_loss(img, txt, logit_scale, logit_bias)
  raise ValueError(f"config.clip.loss={kind!r}: expected 'clip' or 'siglip'")


def retrieval_accuracy(sim, labels=None):
  """Top-1 retrieval in a similarity matrix sim [N_img, N_txt] where image i's own
  caption is text i (square sim). Returns a dict of float32 scalars:

    i2t, t2i:             the retrieved caption / image is the example's own;
    i2t_class, t2i_class: the retrieved one has the same label (when labels [N] given).

    Ties (identical captions have identical embeddings) go to the lowest index.
  """
  idx = jnp.arange(sim.shape[0])
  i2t, t2i = jnp.argmax(sim, axis=1), jnp.argmax(sim, axis=0)
  out = {"i2t": jnp.mean((i2t == idx).astype(jnp.float32)),
         "t2i": jnp.mean((t2i == idx).astype(jnp.float32))}
  if labels is not None:
    out["i2t_class"] = jnp.mean((labels[i2t] == labels).astype(jnp.float32))
    out["t2i_class"] = jnp.mean((labels[t2i] == labels).astype(jnp.float32))
  return out
