"""The task protocol: what every task provides, and the optional capabilities that
generic code (the loop, generation, evaluation, the command lines) asks for.

A task module has one entry point, `make(config, info) -> Task`, where `info` is the
dataset's `DatasetInfo`. A `Task` is a frozen record of plain functions:

    init(key) -> TrainState                      the initial state (every player)
    players: (Player, ...)                       what trains, in update order
    text: TextOptions | None                     text its batches must carry

and, where the task has them, capabilities (None where it does not):

    generator: Generator     it generates samples (sampling, grids, conditioning)
    likelihood: Likelihood   its model has a density (bits/dim)
    features: Features       it gives a frozen feature function to other runs
    guide: Guide             it guides another run's sampler (classifier guidance)
    text_encoder: TextEncoder  it encodes captions for another run (text-to-image)
    autoencoder: Autoencoder   it maps images to latents and back (latent diffusion,
                               latent caching, reconstruction metrics)
    bound: Bound               it bounds log p(x) by sampling latents (ELBO, IWAE)
    denoiser: Denoiser         it denoises on a Gaussian path (a distillation teacher,
                               the initialisation of a student)
    adapters: Adapters         it has small parts worth saving alone (LoRA adapters,
                               learned token embeddings: a fine-tuning run)

Generic code asks `task.generator is None`, never for a task's or a dataset's name.
The one train step for every task is `training.step.make_train_step(task)`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax

from diffusion_jax.data import TextOptions

# sample_fn(params, cond, keys [N], *extra) -> (x [N, ...] in [-1, 1], NFE)
SampleFn = Callable[..., tuple[jax.Array, Any]]


class StepContext(NamedTuple):
  """What a player's loss may read besides its parameters and its slice of the batch.

  step: the state's step counter at the start of the step (int32 scalar);
  update: which of the player's `updates` this is (static int, 0-based);
  dropout_key: a key for network dropout (one per update);
  axis_name: the pmap axis (None under jit), for losses over the global batch;
  state: the TrainState at the start of the step (EMA or target networks).
  """
  step: jax.Array
  update: int
  dropout_key: jax.Array
  axis_name: str | None
  state: Any


@dataclasses.dataclass(frozen=True)
class Player:
  """One trained set of parameters of a task, with its own loss, optimizer, EMA and
  update schedule.

  loss(params, batch, keys, ctx) -> (loss, (metrics, params)): `params` is the whole
    state.params tree with this player's optimised entry being differentiated; the
    loss returns its scalar (a mean over its slice of the batch), a metrics dict, and
    the params tree with any non-gradient updates (BatchNorm statistics) applied.
    `keys` are the per-example keys of its slice; `ctx` a `StepContext`.
  tx, schedule: its optax transformation (frozen parameters already masked out, see
    `optim.make`) and learning-rate schedule (for the `lr` metric).
  name: its entry of state.params / opt_state / ema_params; None when the task has
    a single player whose parameters are the whole tree.
  optimized: the entry of its variables that is optimised ('params' when they are a
    flax variables dict that also holds 'batch_stats'); None: all of them.
  updates: updates per step, update i on the examples j ≡ i (mod updates) of the
    batch (e.g. k discriminator updates per generator update).
  ema_decay: the decay of the exponential moving average kept of it
    (config.train.ema_decay; `state.ema_update`), None: no EMA.
  prefix: metric names, `{prefix}_loss` and `grad_norm_{prefix}` (multi-player tasks).
  mask: mask(params) -> bool pytree, True for the leaves of its optimised parameters
    that train (`optim.trainable`); None: all of them.
  start: the step from which it trains; before it, its parameters and optimizer
    state are left as they are (a discriminator switched on late, Esser et al. 2021).
  """
  loss: Callable
  tx: optax.GradientTransformation
  schedule: Callable
  name: str | None = None
  optimized: str | None = None
  updates: int = 1
  ema_decay: float | None = None
  prefix: str = ""
  mask: Any = None
  start: int = 0


@dataclasses.dataclass(frozen=True)
class Generator:
  """The capability of generating samples.

  sample(*, sampler=None, num_steps=None, guidance=None, strength=1.0,
         classifier=None) -> sample_fn(params, cond, keys [N], *extra) -> (x, NFE):
    options the task has no use for are refused by name when set; None means the
    run's config.sample value. `classifier` is (Guide, scale) for classifier
    guidance (the generator checks that the guide fits it), the guide's parameters
    the last argument of sample_fn.
  conditioning(labels [N], *, prompts=None, images=None, mask=None) -> cond: the
    per-example conditioning dict {"label", ...} of N samples from what a user gives
    (prompts; input images in [-1, 1], cycled to N; an inpainting mask) — the task
    decides what they mean (SDEdit/inpainting sources, super-resolution inputs, ...).
  grid() -> (cond, rows): the training-time sample grid.
  num_classes: the classes samples are conditioned on, by label or by caption (0:
    unconditional); evaluation cycles labels 0..num_classes-1.
  interpolate(params, key, labels [R], num_points, method) -> x [R, P, ...] or None:
    latent interpolation strips (GANs).
  options: the `sample` options it uses (a one-pass generator: none), so callers
    know which settings describe its samples.
  pictures: its samples are pictures (grids and PNGs apply); False for other values
    (e.g. 2-D points).
  frozen: parameters of frozen components the samples need besides the run's own (a
    latent space's autoencoder), or None. Callers pass them to sample_fn as the
    keyword `frozen=` (`generate.compile_sampler(sample_fn, frozen)` does), so they are
    arguments of the compiled sampler rather than constants baked into it.
  """
  sample: Callable[..., SampleFn]
  conditioning: Callable[..., dict]
  grid: Callable[[], tuple[dict, int]]
  num_classes: int = 0
  interpolate: Callable | None = None
  options: tuple[str, ...] = ("sampler", "num_steps", "guidance", "strength", "classifier")
  pictures: bool = True
  frozen: Any = None


@dataclasses.dataclass(frozen=True)
class Likelihood:
  """The capability of a density: model_fn(params, x_t [B,...], t [B]) -> the
  network's unconditional prediction (∅ label), on `path` with `prediction`
  (`diffusion.predictions`), for the variational bound and the PF-ODE."""
  model_fn: Callable
  path: Any
  prediction: str


@dataclasses.dataclass(frozen=True)
class Features:
  """The capability of a frozen feature network for evaluation.

  image(params, x [B,H,W,C] in [-1, 1]) -> (logits [B, K], features [B, D]);
  num_classes: K when the logits are over the dataset's own classes (accuracy and
    Inception Score apply), else 0 (logits are meaningless placeholders);
  text(params, tokens [B, L]) -> L2-normalised embeddings [B, D] in the features'
    space (a joint text–image model, for CLIP score), or None;
  max_length: the token length `text` takes.
  """
  image: Callable
  num_classes: int = 0
  text: Callable | None = None
  max_length: int = 0


@dataclasses.dataclass(frozen=True)
class Guide:
  """The capability of guiding a sampler: log_prob(params, x_t, t [B], labels [B]) ->
  log p(y | x_t, t) [B], valid for models on `path` (noise-conditional) with data of
  `image_shape` and `num_classes`."""
  log_prob: Callable
  path: Any
  noise_conditional: bool
  image_shape: tuple
  num_classes: int


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """The capability of encoding captions for another run (text-to-image):
  encode(params, tokens int [B, max_length]) -> (features [B, L, D], mask [B, L],
  pooled [B, E])."""
  encode: Callable
  max_length: int


@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """The capability of an encoder q(z|x) and a decoder (a VAE, the latent autoencoder of
  latent diffusion, a published Stable Diffusion autoencoder).

  encode(params, x [B, *image_shape] in [-1, 1], labels [B] | None) -> (mean, std)
    [B, *latent_shape]: the diagonal-Gaussian posterior of the raw latent (std = 0 for a
    deterministic encoder);
  decode(params, z [B, *latent_shape], labels [B] | None) -> x̂ [B, *image_shape] in
    [-1, 1] (the decoder's mean, clipped);
  image_shape, latent_shape: per-example shapes;
  scale, shift: the normalisation latent diffusion applies, z_scaled = scale·(z − shift)
    (Rombach et al. 2022, §4.3.2; the published autoencoders' factors; 1 and 0 for a run
    without them, whose scale the latent cache measures from the data);
  conditional: encode/decode need the labels (a class-conditional VAE).
  """
  encode: Callable
  decode: Callable
  image_shape: tuple
  latent_shape: tuple
  scale: float = 1.0
  shift: float = 0.0
  conditional: bool = False


@dataclasses.dataclass(frozen=True)
class Bound:
  """The capability of a latent-variable lower bound on log p(x) (Kingma & Welling 2014;
  Burda et al. 2016).

  log_bounds(params, x [B, *shape] in [-1, 1], labels [B], keys [B], num_samples k) ->
    {"elbo": [B], "iwae": [B]}: log p(x) lower bounds in nats per example of the data the
    model describes (`discrete`: the 8-bit values, in nats of a probability mass; else a
    density on [-1, 1]^D, which evaluation dequantises); "iwae" with k importance samples
    (k = 1 equals the ELBO in expectation).
  discrete: the decoder is a likelihood over the 256 pixel values (bits/dim directly);
    False: a density, evaluated on uniformly dequantised data.
  """
  log_bounds: Callable
  discrete: bool = False


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """The capability of a trained denoiser on a Gaussian path: what a distillation
  teacher gives its student, and what a student is initialised from.

  apply(net, x_t [B, *shape], t [B], labels [B], cond: dict, **kw) -> the network's
    prediction [B, *shape] of type `prediction` on `path` (`diffusion.predictions`),
    net the network's own parameters; cond: the text entries of a batch or of a
    sample conditioning ("tokens", "text_embedding"; `conditioning.py`); kw: network
    keywords (train=True, rngs=..., guidance=w [B] for a `guidance_input` network);
  network(params) -> net: the network's parameters within the run's parameter tree
    (the tree itself for a diffusion run; the student's entry for a distillation run);
  path, prediction: the path and the prediction type;
  null: the ∅ label of classifier-free guidance (0: the model has none);
  shape: the per-example shape it denoises (the latent shape in a latent space);
  guidance_input: the network takes the guidance weight w as the keyword `guidance`
    (a guidance-distilled student, Meng et al. 2023) instead of being called twice.
  """
  apply: Callable
  network: Callable
  path: Any
  prediction: str
  null: int
  shape: tuple
  guidance_input: bool = False


@dataclasses.dataclass(frozen=True)
class Adapters:
  """The capability of small trained parts that load onto other runs (a fine-tuning
  run's LoRA adapters and placeholder embeddings, `finetune.py`).

  export(params) -> (tensors {name: numpy array}, metadata {str: str}): what the loop
    writes alone beside every checkpoint, `<workdir>/adapters/<step>.safetensors` (from
    the EMA parameters), a file far smaller than the checkpoint.
  """
  export: Callable


@dataclasses.dataclass(frozen=True)
class Task:
  """What every task provides; see the module docstring."""
  init: Callable[[jax.Array], Any]
  players: tuple[Player, ...]
  text: TextOptions | None = None
  generator: Generator | None = None
  likelihood: Likelihood | None = None
  features: Features | None = None
  guide: Guide | None = None
  text_encoder: TextEncoder | None = None
  autoencoder: Autoencoder | None = None
  bound: Bound | None = None
  denoiser: Denoiser | None = None
  adapters: Adapters | None = None


def class_grid_labels(num_classes: int, per_class: int):
  """Labels of a sample grid with one row per class: [0]*per_class + [1]*per_class + ...
  (unconditional: 8×8 zeros)."""
  if not num_classes:
    return np.zeros(64, np.int32)
  return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def refuse(what: str, **asked) -> None:
  """Raises naming the options (those whose value is truthy) that `what` cannot use."""
  names = [name for name, on in asked.items() if on]
  if names:
    raise ValueError(f"{what}: {', '.join(names)} do not apply")
