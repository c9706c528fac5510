"""The diffusion task: a denoiser network trained on a Gaussian path, and its samplers.

A task is a plain module with
  init(config, key, info) -> TrainState
  train_step(config, info) -> step(state, batch, key, axis_name=None) -> (state, metrics)
  sample(config, info, ...) -> sample_fn(params, labels [N], keys [N]) -> images [N,H,W,C]
where `info` is the dataset's `DatasetInfo` (image shape, number of classes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import nets, samplers
from diffusion_jax.diffusion import losses, paths, predictions
from diffusion_jax.training import optim, step as step_lib
from diffusion_jax.training.state import TrainState


def model(config, info):
  return nets.build_denoiser(config.model, out_channels=info.image_shape[-1],
                             num_classes=info.num_classes)


def _scaled(path, config, x, t):
  """Network input: x_t times the prediction's input preconditioning (EDM's c_in)."""
  scale = predictions.input_scale(path, config.diffusion.prediction, t)
  return x * scale.reshape(scale.shape + (1,) * (x.ndim - 1))


def init(config, key, info) -> TrainState:
  x = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  params = model(config, info).init(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  tx, _ = optim.make(config.optim, config.train.num_steps)
  return TrainState.create(params, tx)


def train_step(config, info):
  net = model(config, info)
  path = paths.from_config(config.diffusion)
  tx, sched = optim.make(config.optim, config.train.num_steps)

  def loss_fn(params, batch, keys, dropout_key):
    model_fn = lambda x, t, y: net.apply({"params": params}, _scaled(path, config, x, t), t, y,
                                         train=True, rngs={"dropout": dropout_key})
    loss, _ = losses.loss(config.diffusion, path, model_fn, batch["image"], batch["label"],
                          keys, info.num_classes)
    return loss, {}

  return step_lib.make_train_step(loss_fn, tx, sched, ema_decay=config.train.ema_decay)


def sample(config, info, *, sampler: str | None = None, num_steps: int | None = None,
           guidance: float | None = None):
  """sample_fn(params, labels [N], keys [N]) -> (images [N,H,W,C] in [-1, 1], NFE).

  Defaults come from config.sample. Guidance applies only to class-conditional models.
  Sample i depends only on keys[i] and labels[i].
  """
  s = config.sample
  sampler = s.sampler if sampler is None else sampler
  num_steps = s.num_steps if num_steps is None else num_steps
  guidance = s.guidance if guidance is None else guidance
  solve = samplers.get(sampler)
  options = {"ddim": {"eta": s.ddim_eta}, "ddpm": {"variance": s.ddpm_variance},
             "pc": {"snr": s.pc_snr, "corrector_steps": s.pc_corrector_steps},
             "edm": {"s_churn": s.edm_churn}}.get(sampler, {})
  if s.spacing is not None:  # else each sampler's own default (uniform; karras for edm)
    options["spacing"] = s.spacing
  net = model(config, info)
  path = paths.from_config(config.diffusion)
  shape = tuple(info.image_shape)

  def sample_fn(params, labels, keys):
    model_fn = lambda x, t, y: net.apply({"params": params}, _scaled(path, config, x, t), t, y)
    if info.num_classes:
      model_fn = samplers.guidance.classifier_free(model_fn, guidance, info.num_classes)
    denoiser = samplers.make_denoiser(model_fn, path, config.diffusion.prediction, labels,
                                      clip_x0=s.clip_x0)
    x1 = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    x0, nfe = solve(denoiser, path, x1, step_keys, num_steps, **options)
    nfe = nfe * (2 if info.num_classes and guidance else 1)  # CFG: two passes per step
    return jnp.clip(x0, -1.0, 1.0), nfe

  return sample_fn
