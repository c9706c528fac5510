"""Fine-tuning a trained diffusion run with a few parameters: LoRA adapters, textual
inversion's placeholder tokens, or the text encoder's own weights.

A fine-tuning run's config is its base run's with config.task = 'finetune', the base
named by config.init.from_workdir (its network lands under 'denoiser': config.init.map
= (('^', 'denoiser/'),), `training/warmstart.py`) and config.finetune saying what
trains (config.finetune.method):

    lora                LoRA adapters (Hu et al. 2021) on the denoiser's layers matched by
                        finetune.lora_targets (and, with train_text_encoder, the clip text
                        encoder's, finetune.lora_text_targets); every base weight frozen
    textual_inversion   the embeddings of placeholder tokens <v0>…<v{K-1}> only (Gal et
                        al. 2022): denoiser and text encoder frozen
    full                every denoiser weight and, with train_text_encoder, the text
                        encoder's (DreamBooth's text-encoder variant, Ruiz et al. 2023)

State layout (one TrainState):
    params      {"denoiser": the network, "lora": {"denoiser": {path: {"a", "b"}},
                 "text": {...}} (lora), "embeddings": [K, D] (finetune.placeholders > 0),
                 "text": the clip run's parameters (full + train_text_encoder)}
    ema_params  the same tree (a frozen leaf's EMA is the leaf itself)
Frozen parameters have no optimizer state (`optim.masked`); config.optim.trainable,
when set, replaces the method's choice (patterns over these paths). The loss is the
diffusion task's (so DreamBooth's prior preservation is `data.paired_name` with
`diffusion.prior_weight`), and the run samples through the diffusion task's generator,
with `lora_scale` (config.sample.lora_scale). The adapters and embeddings are also
written alone beside every checkpoint (`Adapters.export`, a small .safetensors file)
and load onto any run of the same architecture (`attach`; `diffusion-jax-sample
--adapter=FILE[:WEIGHT]`), composable with weights, or merge into its weights
(`merged`).
"""
from __future__ import annotations

import contextlib
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import config as config_lib, io, runs
from diffusion_jax.data import text as text_lib
from diffusion_jax.nets import adapters as adapters_lib
from diffusion_jax.training import optim, state as state_lib
from diffusion_jax.training.tasks import conditioning as cond_lib, diffusion, distill
from diffusion_jax.training.tasks.base import Adapters, Player, Task

__all__ = ["FORMAT", "attach", "lora_factor", "make", "merged", "read_adapters"]

FORMAT = "diffusion_jax.finetune/1"
_EMBED = "text/token_embedding"  # the clip text encoder's token table (module path)
# What a fine-tuning run shares with its base run: the network and what it denoises
# (its data and captions are its own: a few images, placeholder prompts).
SAME = ("model", "diffusion.path", "diffusion.prediction", "diffusion.num_steps",
        "diffusion.beta_schedule", "diffusion.beta_min", "diffusion.beta_max",
        "diffusion.sigma_min", "diffusion.sigma_max", "diffusion.rho",
        "diffusion.sigma_data", "text.encoder", "text.clip_workdir", "text.max_length",
        "text.embedding_feature", "latent", "superres.low_res")


def lora_factor(config) -> float:
  """α/r of config.finetune (α = r when lora_alpha is None)."""
  f = config.finetune
  return float(f.lora_rank if f.lora_alpha is None else f.lora_alpha) / f.lora_rank


def _trainable(config) -> tuple[str, ...]:
  f = config.finetune
  if config.optim.trainable:
    return tuple(config.optim.trainable)
  text = f.train_text_encoder
  patterns = {"lora": ("^lora/",), "textual_inversion": (),
              "full": ("^denoiser/",) + (("^text/(text|text_projection)/",) if text else ())}
  return patterns[f.method] + (("^embeddings$",) if f.placeholders else ())


def _check(config):
  f = config.finetune
  text = config.text.encoder == "clip"
  if f.method == "textual_inversion" and not f.placeholders:
    raise ValueError("config.finetune.method='textual_inversion' learns placeholder tokens: "
                     "set config.finetune.placeholders >= 1")
  if (f.placeholders or f.train_text_encoder) and not text:
    raise ValueError("config.finetune.placeholders / train_text_encoder need a clip text "
                     f"encoder (config.text.encoder='clip'; this run has "
                     f"{config.text.encoder!r})")
  if f.placeholders and f.placeholders > text_lib.NUM_PLACEHOLDERS:
    raise ValueError(f"config.finetune.placeholders={f.placeholders}: the tokenizer reserves "
                     f"{text_lib.NUM_PLACEHOLDERS}")
  if f.method == "lora" and config.model.scan:
    raise ValueError("LoRA needs the DiT's blocks unscanned (config.model.scan=False)")
  if f.method == "textual_inversion" and f.train_text_encoder:
    raise ValueError("config.finetune.train_text_encoder with textual inversion: textual "
                     "inversion trains the placeholder embeddings only")


@functools.lru_cache(maxsize=4)
def _base_config(workdir: str, step):
  with jax.ensure_compile_time_eval():
    return runs.read(workdir, step)[0]


def check_base(config) -> None:
  """The fine-tuning run's network and what it denoises equal its base run's
  (`SAME`, naming every key that differs)."""
  if not config.init.from_workdir:
    raise ValueError("config.task='finetune' needs config.init.from_workdir (the workdir "
                     "of the trained diffusion run it adapts)")
  distill.check_same(config, _base_config(config.init.from_workdir, config.init.step),
                     config.init.from_workdir, role="base run", key="config.init.from_workdir",
                     keys=SAME)


def make(config, info) -> Task:
  """The diffusion task of the run's config over the fine-tuning tree (module
  docstring). Metrics: loss, grad_norm, lr (of what trains)."""
  _check(config)
  f = config.finetune
  text_params = None
  if config.text.encoder == "clip":
    text_encoder, text_params = cond_lib.text_component(config.text.clip_workdir)
  factor = lora_factor(config)

  def adapt(params, lora_scale=1.0):
    lora = params.get("lora", {})
    net_context, text_context = contextlib.nullcontext, contextlib.nullcontext
    if "denoiser" in lora:
      net_context = functools.partial(adapters_lib.lora, lora["denoiser"],
                                      factor * lora_scale, f.lora_dropout)
    text_parts = []
    if "text" in lora:
      text_parts.append(functools.partial(adapters_lib.lora, lora["text"], factor * lora_scale))
    if "embeddings" in params:
      text_parts.append(functools.partial(adapters_lib.embedding_rows,
                                          {_EMBED: params["embeddings"]}))
    if text_parts:
      text_context = functools.partial(_stacked, text_parts)
    return diffusion.Adapted(net=params["denoiser"], text=params.get("text"),
                             net_context=net_context, text_context=text_context)

  # The diffusion task of the run's config; config.optim.trainable names paths of the
  # fine-tuning tree (this task's players), not of the network alone.
  inner = config_lib.from_json(config_lib.to_json(config))
  inner.unlock()
  inner.optim.trainable = ()
  inner.lock()
  base = diffusion.make(inner, info, adapt=adapt)
  plain = diffusion.make(inner, info)  # the base network alone: its init and layers
  tx, sched = optim.make(config.optim, config.train.num_steps, patterns=_trainable(config))
  players = (Player(loss=base.players[0].loss, tx=tx, schedule=sched,
                    ema_decay=config.train.ema_decay, mask=optim.trainable(_trainable(config))),)

  def init(key):
    check_base(config)  # a fine-tuning run starts from its base (the loop's warm start)
    k_net, k_lora, k_text, k_emb = jax.random.split(key, 4)
    net = plain.init(k_net).params
    params = {"denoiser": net}
    if f.method == "lora":
      x = jnp.zeros((1,) + plain.denoiser.shape, jnp.float32)
      t, y = jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
      call = lambda: plain.denoiser.apply(net, x, t, y, {})
      params["lora"] = {"denoiser": adapters_lib.lora_init(
          adapters_lib.lora_targets(call, net, f.lora_targets), f.lora_rank, k_lora)}
      if f.train_text_encoder:
        tokens = jnp.zeros((1, config.text.max_length), jnp.int32)
        call = lambda: text_encoder.encode(text_params, tokens)
        params["lora"]["text"] = adapters_lib.lora_init(
            adapters_lib.lora_targets(call, text_params, f.lora_text_targets), f.lora_rank,
            k_text)
    if f.method == "full" and f.train_text_encoder:
      params["text"] = jax.tree.map(jnp.asarray, text_params)
    if f.placeholders:
      params["embeddings"] = _placeholder_init(config, text_params, k_emb)
    return state_lib.init_state(players, params)

  def export(params):
    tensors = {}
    for part, tree in params.get("lora", {}).items():
      for path, ab in adapters_lib.by_layer(tree).items():
        for name in ("a", "b"):
          tensors[f"lora/{part}/{path}/{name}"] = np.asarray(ab[name], np.float32)
    if "embeddings" in params:
      tensors["embeddings"] = np.asarray(params["embeddings"], np.float32)
    meta = {"format": FORMAT, "method": f.method, "lora_rank": str(f.lora_rank),
            "lora_factor": repr(lora_factor(config)), "placeholders": str(f.placeholders),
            "model": config_lib.to_json(config.model), "text": config_lib.to_json(config.text)}
    return tensors, meta

  return Task(init=init, players=players, text=base.text, generator=base.generator,
              likelihood=base.likelihood, denoiser=base.denoiser,
              adapters=Adapters(export=export))


@contextlib.contextmanager
def _stacked(parts):
  with contextlib.ExitStack() as stack:
    for part in parts:
      stack.enter_context(part())
    yield


def _placeholder_init(config, text_params, key):
  """[K, D] first embeddings of the placeholders: the mean embedding of
  finetune.initializer's tokens (Gal et al. 2022 start from a coarse descriptor's
  embedding), else N(0, 0.02²) as the table's own initialisation."""
  table = jnp.asarray(text_params["text"]["token_embedding"]["embedding"])
  K = config.finetune.placeholders
  word = config.finetune.initializer
  if word:
    ids = text_lib.encode([word], len(word.encode("utf-8")) + 2)[0][1:-1]
    return jnp.broadcast_to(jnp.mean(table[ids], axis=0), (K, table.shape[1]))
  return 0.02 * jax.random.normal(key, (K, table.shape[1]), table.dtype)


# --- adapters as files --------------------------------------------------------------

def read_adapters(path: str):
  """(tensors, metadata) of an adapter file written beside a fine-tuning run's
  checkpoints (`<workdir>/adapters/<step>.safetensors`; local or a cloud URI)."""
  from safetensors import safe_open
  try:
    with io.local_file(path) as local, safe_open(local, framework="numpy") as f:
      meta = f.metadata() or {}
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors' own SafetensorError is neither OSError nor ValueError
    raise ValueError(f"cannot read adapter file {path} (not a diffusion_jax adapter file?): "
                     f"{e}") from e
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a diffusion_jax adapter file (format "
                     f"{meta.get('format')!r}, expected {FORMAT!r})")
  return tensors, meta


def _lora_trees(tensors):
  out = {}
  for key, value in tensors.items():
    if key.startswith("lora/"):
      _, part, rest = key.split("/", 2)
      path, name = rest.rsplit("/", 1)
      out.setdefault(part, {}).setdefault(path, {})[name] = jnp.asarray(value)
  return {part: adapters_lib.nested(layers) for part, layers in out.items()}


def attach(config, params, files):
  """(config, params) of a fine-tuning view of a diffusion run (`config`, its
  parameters) with adapter files attached: files = [(path, weight), ...]. LoRA adapters
  compose exactly (`adapters.lora_compose`: Σᵢ wᵢ·(αᵢ/rᵢ)·BᵢAᵢ), at most one file may
  bring placeholder embeddings. Each file's model and text sections must equal the
  run's (naming the keys that differ). Sample it through `tasks.make(config, info)`'s
  generator (lora_scale multiplies every adapter)."""
  if config.task != "diffusion":
    raise ValueError(f"adapters attach to a diffusion run; this one is config.task="
                     f"{config.task!r}")
  loras, embeddings = {"denoiser": [], "text": []}, None
  for path, weight in files:
    tensors, meta = read_adapters(path)
    for section in ("model", "text"):
      mine = json.loads(config_lib.to_json(config[section]))
      theirs = json.loads(meta[section])
      diffs = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)
                     and f"{section}.{k}" not in config_lib.COMPUTE_ONLY_KEYS
                     and (section == "model" or f"text.{k}" in SAME))
      if diffs:
        raise ValueError(f"adapter {path} was trained on another architecture: config."
                         f"{section} differs in {diffs}")
    for part, tree in _lora_trees(tensors).items():
      loras[part].append((tree, float(meta["lora_factor"]) * weight))
    if "embeddings" in tensors:
      if embeddings is not None:
        raise ValueError(f"{path}: only one adapter file may bring placeholder embeddings")
      embeddings = jnp.asarray(tensors["embeddings"])
  new = config_lib.from_json(config_lib.to_json(config))
  new.unlock()
  new.task = "finetune"
  out = {"denoiser": params}
  if loras["denoiser"] or loras["text"]:
    composed = {part: adapters_lib.lora_compose(v) for part, v in loras.items() if v}
    if "denoiser" not in composed:
      composed["denoiser"] = {}
    rank = max(int(ab["a"].shape[-1]) for tree in composed.values()
               for ab in adapters_lib.by_layer(tree).values())
    new.finetune.update(method="lora", lora_rank=rank, lora_alpha=float(rank),
                        lora_dropout=0.0, train_text_encoder="text" in composed)
    new.finetune.lora_targets = tuple(
        f"^{re.escape(p)}$" for p in adapters_lib.by_layer(composed["denoiser"])) or (
        new.finetune.lora_targets)
    out["lora"] = composed
  else:
    new.finetune.update(method="full", train_text_encoder=False)
  if embeddings is not None:
    new.finetune.placeholders = int(embeddings.shape[0])
    out["embeddings"] = embeddings
  new.lock()
  return new, out


def merged(config, params, *, lora_scale: float = 1.0):
  """The denoiser's parameters of a LoRA fine-tuning tree with its adapters merged in,
  W + (α/r)·s·BA (exact up to rounding): a plain diffusion run's parameters (text-encoder
  adapters and embeddings are not part of them)."""
  lora = params.get("lora", {})
  return adapters_lib.lora_merge(params["denoiser"], lora.get("denoiser", {}),
                                 lora_factor(config) * lora_scale)
