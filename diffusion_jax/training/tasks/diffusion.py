"""The diffusion task: a denoiser network trained on a Gaussian path, and its samplers.

One player (the denoiser, with an EMA) and the denoising loss of `diffusion/losses.py`
on config.diffusion's path, prediction, time sampling and weighting. Capabilities:
`generator` (every sampler of `samplers/`, CFG, classifier guidance, SDEdit,
inpainting, super-resolution inputs; `conditioning.py` says what a model is
conditioned on), `likelihood` (bits/dim; not for super-resolution or
precomputed-text models, which need inputs a density of x alone does not have) and
`denoiser` (the network on its path: a distillation teacher; not super-resolution).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from diffusion_jax import data, nets, samplers
from diffusion_jax.diffusion import losses, paths, predictions
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks import conditioning as cond_lib, latent as latent_lib
from diffusion_jax.training.tasks.base import Denoiser, Generator, Likelihood, Player, Task


def model(config, info):
  return nets.build_denoiser(config.model, out_channels=info.image_shape[-1],
                             num_classes=cond_lib.num_classes(config, info))


def _scaled(path, config, x, t):
  """Network input: x_t times the prediction's input preconditioning (EDM's c_in)."""
  scale = predictions.input_scale(path, config.diffusion.prediction, t)
  return x * scale.reshape(scale.shape + (1,) * (x.ndim - 1))


def sampler_options(sample_cfg, sampler: str) -> dict:
  """Keyword arguments of `samplers.<sampler>` from config.sample: its own section
  (config.sample.<sampler>, e.g. sample.ddim.eta) and the time grid: config.sample.times
  (an explicit t_0 > ... > t_N, which must have num_steps + 1 entries) when set, else the
  spacing when set (else each sampler's default: uniform; karras for edm)."""
  own = sample_cfg.get(sampler)
  options = dict(own) if isinstance(own, ConfigDict) else {}
  times = sample_cfg.get("times")
  if times is not None:
    if len(times) != sample_cfg.num_steps + 1:
      raise ValueError(f"config.sample.times has {len(times)} times ({len(times) - 1} steps) "
                       f"but config.sample.num_steps={sample_cfg.num_steps}: set "
                       f"config.sample.num_steps={len(times) - 1} (len(times) − 1)")
    options["spacing"] = tuple(float(t) for t in times)
  elif sample_cfg.spacing is not None:
    options["spacing"] = sample_cfg.spacing
  return options


class Adapted(NamedTuple):
  """What a fine-tuning run's parameter tree means to the diffusion task (`make`'s
  `adapt`): the denoiser's parameters, the text encoder's (None: the clip run's own),
  and the contexts its network and its text encoder are called in (LoRA adapters,
  placeholder embeddings: `nets.adapters`)."""
  net: Any
  text: Any = None
  net_context: Callable[[], Any] = contextlib.nullcontext
  text_context: Callable[[], Any] = contextlib.nullcontext


def prior_preservation(per_example, paired, weight: float):
  """DreamBooth's L_instance + λ·L_prior (Ruiz et al. 2023, eq. 2) on a paired batch whose
  halves are the instance and the class ('paired' = 1) examples: the batch mean of
  2·((1 − p) + λ·p)·ℓ, which with equal halves is mean(ℓ_instance) + λ·mean(ℓ_prior),
  a plain per-example mean (so any number of devices computes the same)."""
  p = paired.astype(jnp.float32)
  return jnp.mean(2.0 * ((1.0 - p) + weight * p) * per_example)


def make(config, info, *, denoiser_wrapper=None, adapt=None) -> Task:
  """`info` describes the batches: pictures, or a latent cache (`data.latents`). In a
  latent space (config.latent.autoencoder, or a cache) the denoiser works on the
  scaled latents and the generator decodes to pixels (`latent.py`).

  denoiser_wrapper: denoiser -> denoiser, applied to the denoiser every sampler of the
  generator runs on (before classifier guidance and inpainting): how a task whose
  network is a diffusion denoiser with another output map samples through this
  generator (a consistency model's boundary parametrisation, `consistency.py`).

  adapt: (params, lora_scale) -> `Adapted`: the run's parameters are a fine-tuning
  tree (`finetune.py`) rather than the network's own; every use (loss, samplers,
  denoiser, likelihood) goes through it, and the generator takes `lora_scale`.

  A batch with "paired" (data.paired_name: DreamBooth's class images as its second
  half) is weighted by `prior_preservation` with λ = config.diffusion.prior_weight."""
  space = latent_lib.space(config, info)
  if space is not None and config.superres.low_res:
    raise ValueError("config.superres.low_res with a latent space (config.latent."
                     "autoencoder / a latent cache): super-resolution runs in pixel space")
  pixel_info, info = (space.pixel_info, space.latent_info) if space else (info, info)
  cond_lib.check_superres(config, info)
  net = model(config, info)
  path = paths.from_config(config.diffusion)
  text = cond_lib.text_conditioner(config)
  null = cond_lib.null_label(config, info)
  guided = bool(config.model.guidance_input)  # w is an input (guidance distillation)
  tx, sched = optim.make(config.optim, config.train.num_steps)

  def apply(params, x, t, y, cond, sr=None, lora_scale=1.0, **kw):
    a = Adapted(params) if adapt is None else adapt(params, lora_scale)
    with a.text_context():
      text_kw = cond_lib.text_kwargs(text, cond, y, null, a.text)
    with a.net_context():
      return net.apply({"params": a.net}, _scaled(path, config, x, t), t, y, cond=sr,
                       **text_kw, **kw)

  def init(key):
    x = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
    example = {}
    if config.text.encoder == "precomputed":  # shape from the dataset's feature
      example["text_embedding"] = jnp.zeros((1,) + cond_lib.embedding_shape(config))
    labels = jnp.zeros((1,), jnp.int32)
    params = net.init(key, x, jnp.zeros((1,)), labels,
                      cond=x if config.superres.low_res else None,
                      **cond_lib.text_kwargs(text, example, labels, -1),
                      **({"guidance": jnp.zeros((1,))} if guided else {}))["params"]
    return state_lib.init_state(players, params)

  def loss(params, batch, keys, ctx):
    if guided:
      raise ValueError("config.model.guidance_input=True: the denoising loss has no guidance "
                       "weight to give the network; a w-input network is trained by "
                       "config.task='guidance_distillation' (or 'progressive' from one)")
    x0 = batch["image"] if space is None else space.draw(batch, keys)
    sr = None
    if config.superres.low_res:
      sr = cond_lib.low_res_condition(config, info, cond_lib.downsample(config, x0), keys)
    model_fn = lambda x, t, y: apply(params, x, t, y, batch, sr, train=True,
                                     rngs={"dropout": ctx.dropout_key})
    value, per_example = losses.loss(config.diffusion, path, model_fn, x0, batch["label"],
                                     keys, null)
    if "paired" in batch:
      value = prior_preservation(per_example, batch["paired"], config.diffusion.prior_weight)
    return value, ({}, params)

  players = (Player(loss=loss, tx=tx, schedule=sched, ema_decay=config.train.ema_decay,
                    mask=optim.trainable(config.optim.trainable)),)

  def sample(*, sampler=None, num_steps=None, guidance=None, strength=1.0, classifier=None,
             lora_scale=None):
    """sample_fn(params, cond, keys [N], classifier_params=None, *, frozen=None) ->
    (images [N,H,W,C] in [-1, 1], NFE); cond as in `conditioning.py`; frozen: the
    latent space's autoencoder parameters (`Generator.frozen`; None: closed over). strength: SDEdit's t₀ (the input is
    noised to t₀ and solved back from there). classifier: (Guide, scale) for
    classifier guidance, its parameters the last argument of sample_fn. lora_scale:
    the s of a LoRA run's W + (α/r)·s·BA (fine-tuning runs only; default
    config.sample.lora_scale). Defaults come from config.sample. CFG applies to class-
    and text-conditional models. Sample i depends only on keys[i] and the i-th entries
    of cond."""
    s = config.sample
    if adapt is None and lora_scale is not None:
      raise ValueError("lora_scale applies to a run with LoRA adapters (config.task="
                       "'finetune', config.finetune.method='lora')")
    lora_scale = s.lora_scale if lora_scale is None else lora_scale
    sampler = s.sampler if sampler is None else sampler
    num_steps = s.num_steps if num_steps is None else num_steps
    guidance = s.guidance if guidance is None else guidance
    if not 0.0 < strength <= 1.0:
      raise ValueError(f"strength={strength}: SDEdit's t₀ must be in (0, 1]")
    solve, options = samplers.get(sampler), sampler_options(s, sampler)
    if classifier is not None:
      _check_guide(classifier[0])
    shape = tuple(info.image_shape)
    cfg_on = bool(null and guidance) and not guided
    with jax.ensure_compile_time_eval():
      prior_std = float(path.ab(1.0)[1])

    def sample_fn(params, cond, keys, classifier_params=None, *, frozen=None):
      labels = cond["label"]
      if strength < 1 and "image" not in cond:
        raise ValueError("SDEdit (strength < 1) needs an input image")
      sr = None
      if config.superres.low_res:
        if "low_res" not in cond:
          raise ValueError("this super-resolution model needs low-resolution inputs")
        sr = cond_lib.low_res_condition(config, info, cond["low_res"], keys)
      if config.text.encoder == "clip" and "tokens" not in cond:
        raise ValueError("this text-conditional model needs 'tokens' in the conditioning "
                         "(see `conditioning.conditioning`)")

      def model_fn(x, t, y):
        # CFG stacks [x, x]: repeat the image conditioning to match.
        c = None if sr is None else jnp.tile(sr, (x.shape[0] // sr.shape[0], 1, 1, 1))
        kw = {"guidance": jnp.full(x.shape[:1], guidance, jnp.float32)} if guided else {}
        return apply(params, x, t, y, cond, c, lora_scale, **kw)

      if cfg_on:
        model_fn = samplers.guidance.classifier_free(model_fn, guidance, null)
      denoiser = samplers.make_denoiser(model_fn, path, config.diffusion.prediction, labels,
                                        clip_x0=s.clip_x0)
      if denoiser_wrapper is not None:
        denoiser = denoiser_wrapper(denoiser)
      if classifier is not None:
        guide, scale = classifier
        denoiser = samplers.guidance.classifier(
            denoiser, path, lambda x, t: guide.log_prob(classifier_params, x, t, labels), scale)
      # The prior at t = 1: x₁ = a(1)·x + b(1)·z ≈ b(1)·z (a(1) = 0 on the flow path and
      # ≈ 0 on VP paths; on VE / EDM paths b(1) = σ_max dominates the data term).
      x_init = prior_std * jax.vmap(
          lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
      source = cond.get("image")
      if source is not None and space is not None:  # editing inputs are pictures
        source = space.encode(source, labels, frozen)
      if strength < 1:
        x_init = samplers.editing.noise_to(path, source, strength,
                                           jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys))
      if "mask" in cond:
        m = cond["mask"] if space is None else space.mask(cond["mask"])
        denoiser = samplers.editing.inpaint(denoiser, path, source, m)
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
      x0, nfe = solve(denoiser, path, x_init, step_keys, num_steps, t_start=strength,
                      **options)
      if space is not None:
        x0 = space.decode(x0, labels, frozen)
      if "mask" in cond:  # in pixel space: the known pixels exactly
        x0 = samplers.editing.paste(x0, cond["image"], cond["mask"])
      return jnp.clip(x0, -1.0, 1.0), nfe * (2 if cfg_on else 1)  # CFG: two passes per call

    return sample_fn

  def _check_guide(guide):
    """A guiding classifier must be noise-conditional on this path and data."""
    problems = []
    if guide.path != path:
      problems.append(f"its path {guide.path} differs from the model's {path}")
    if not guide.noise_conditional:
      problems.append("it was trained on clean images only "
                      "(config.classifier.noise_conditional=False)")
    if guide.image_shape != tuple(info.image_shape) or guide.num_classes != info.num_classes:
      problems.append(f"its data ({guide.image_shape}, {guide.num_classes} classes) differs "
                      f"from the model's ({tuple(info.image_shape)}, {info.num_classes} classes)")
    if problems:
      raise ValueError("cannot guide with this classifier: " + "; ".join(problems))

  generator = Generator(
      sample=sample,
      conditioning=lambda labels, **kw: cond_lib.conditioning(config, pixel_info, labels, **kw),
      grid=lambda: cond_lib.grid_conditioning(config, pixel_info),
      num_classes=cond_lib.sample_classes(config, info), pictures=pixel_info.is_image,
      frozen=None if space is None else space.params,
      options=Generator.options + (() if adapt is None else ("lora_scale",)))

  likelihood = None  # of pixels: not in a latent space
  if not config.superres.low_res and config.text.encoder != "precomputed" and space is None:
    def unconditional(params, x, t):  # ∅: a guidance-distilled student's w is moot (0)
      kw = {"guidance": jnp.zeros(x.shape[:1], jnp.float32)} if guided else {}
      return apply(params, x, t, jnp.full(x.shape[:1], null, jnp.int32), {}, **kw)
    likelihood = Likelihood(model_fn=unconditional, path=path,
                            prediction=config.diffusion.prediction)

  denoiser = None
  if not config.superres.low_res:  # a super-resolution input is not a batch entry
    denoiser = Denoiser(apply=lambda net_params, x, t, y, cond, **kw: apply(
                            net_params, x, t, y, cond, None, **kw),
                        network=lambda params: params, path=path,
                        prediction=config.diffusion.prediction, null=null,
                        shape=tuple(info.image_shape), guidance_input=guided)

  return Task(init=init, players=players,
              text=data.text_options(config) if config.text.encoder else None,
              generator=generator, likelihood=likelihood, denoiser=denoiser)
