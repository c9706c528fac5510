"""Parameter-efficient adapters of any flax network, without changing its code: LoRA
on chosen Dense / DenseGeneral / Conv layers, and extra rows of an embedding table
(textual inversion's new tokens).

Both act through `flax.linen.intercept_methods` while a network is applied: a layer
whose module path ('SelfAttention2D_0/qkv', 'blocks_3/attn/proj', 'text/token_embedding')
has an adapter gets its output changed, every other layer runs as written. So one
adapter tree serves the U-Net, the DiT and the CLIP text encoder alike, and the base
parameters are never touched.

LoRA (Hu et al. 2021, eq. 3): a layer h = W x becomes h = W x + (α/r)·s·B A x, with
A [d_in, r], B [r, d_out] and B = 0 at the start, so a fresh adapter is exactly the
base model; s is the inference-time `lora_scale`. For a kernel W of shape
in_axes + out_axes (Dense: [i, o]; DenseGeneral: e.g. [C, 3, heads, head_dim] or
[heads, head_dim, C]; Conv: [kh, kw, i, o]) an adapter is

    {"a": in_axes + (r,), "b": (r,) + out_axes}

and its weight is ΔW = tensordot(a, b, 1), of W's shape: a Conv's A is itself a
kh×kw convolution to r channels and B a 1×1 one (diffusers' LoRA convolutions).
Dropout (on the adapter's input only) draws from the network's 'dropout' rng stream
when the network is called with one (training), and is off otherwise.

    found = lora_targets(lambda: net.apply(v, x, t, y), v["params"], ("attn/(qkv|out)$",))
    adapters = lora_init(found, rank=4, key=key)      # {"SelfAttention2D_0": {"qkv": {"a", "b"}}}
    with lora(adapters, factor=alpha / rank * lora_scale):
      y = net.apply(v, x, t, y)                       # the adapted network
    merged = lora_merge(v["params"], adapters, factor)  # the same network, one set of weights

Several adapters combine exactly (`lora_compose`): concatenated along the rank with
their factors and weights folded into B, Σᵢ wᵢ·fᵢ·Bᵢ Aᵢ x is one adapter of rank Σ rᵢ.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["by_layer", "embedding_rows", "nested", "lora", "lora_compose", "lora_init", "lora_merge",
           "lora_targets", "module_path"]

_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv)


def module_path(module) -> str:
  """'a/b/c': a bound module's path of names within the network."""
  return "/".join(str(p) for p in module.path)


def _input_axes(module) -> int:
  """How many leading axes of the layer's kernel are contracted with its input."""
  if isinstance(module, nn.Conv):
    return len(tuple(np.atleast_1d(module.kernel_size))) + 1
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ValueError(f"LoRA on {module_path(module)}: DenseGeneral with batch_dims is "
                       "not supported")
    return len(tuple(np.atleast_1d(module.axis)))
  return 1


def lora_targets(apply_fn, params, patterns: Sequence[str]) -> dict[str, tuple]:
  """{module path: (kernel shape, input axes)} of the Dense / DenseGeneral / Conv
  layers that `apply_fn()` (a closure applying the network to example inputs, traced
  abstractly, nothing computed) calls and whose path re.search-es one of `patterns`;
  `params`: the network's parameters (for the kernels' shapes; layers without a kernel
  there belong to another network the call runs, and are skipped). A pattern that
  matches no layer is an error naming it and listing the layer paths."""
  compiled = [(p, re.compile(p)) for p in patterns]
  if not compiled:
    raise ValueError("LoRA needs target patterns (config.finetune.lora_targets)")
  seen, found = [], {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, _LAYERS):
      path = module_path(m)
      seen.append(path)
      if any(r.search(path) for _, r in compiled):
        found[path] = _input_axes(m)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(apply_fn)
  unused = [p for p, r in compiled if not any(r.search(s) for s in seen)]
  if unused:
    raise ValueError(f"LoRA target pattern(s) {unused} match no Dense / DenseGeneral / "
                     f"Conv layer; the network's layers are {sorted(set(seen))}")
  # Layers of other networks that apply_fn also calls (a text encoder run inside a
  # denoiser's call) have no kernel in `params`: they are not this network's.
  flat = traverse_util.flatten_dict(params, sep="/")
  return {path: (tuple(flat[_kernel(path)].shape), n_in)
          for path, n_in in sorted(found.items()) if _kernel(path) in flat}


def _kernel(path: str) -> str:
  """The kernel's path of the layer at module path `path` ('' : the network itself)."""
  return f"{path}/kernel" if path else "kernel"


def by_layer(adapters) -> dict:
  """{module path: {"a", "b"}} of an adapter tree (nested like the network's
  parameters: {"SelfAttention2D_0": {"qkv": {"a", "b"}}})."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(adapters), sep="/").items():
    layer, _, name = path.rpartition("/")
    out.setdefault(layer, {})[name] = value
  return out


def nested(layers: Mapping[str, Mapping]) -> dict:
  """The adapter tree of {module path: {"a", "b"}} (inverse of `by_layer`)."""
  return traverse_util.unflatten_dict(
      {f"{layer}/{name}" if layer else name: v for layer, ab in layers.items()
       for name, v in ab.items()},
      sep="/")


def lora_init(targets: Mapping[str, tuple], rank: int, key) -> dict:
  """Fresh adapters for `lora_targets`' layers, a tree nested like the network's
  parameters ({"SelfAttention2D_0": {"qkv": {"a", "b"}}}): A ~ N(0, 1/r²) (diffusers' /
  peft's 'gaussian' initialisation, std 1/r), B = 0."""
  if rank < 1:
    raise ValueError(f"LoRA rank {rank} must be >= 1 (config.finetune.lora_rank)")
  out = {}
  for i, (path, (shape, n_in)) in enumerate(sorted(targets.items())):
    a_shape, b_shape = tuple(shape[:n_in]) + (rank,), (rank,) + tuple(shape[n_in:])
    a = jax.random.normal(jax.random.fold_in(key, i), a_shape, jnp.float32) / rank
    out[path] = {"a": a, "b": jnp.zeros(b_shape, jnp.float32)}
  return nested(out)


def _delta(adapter):
  return jnp.tensordot(adapter["a"], adapter["b"], axes=1)


def _low_rank(module, x, adapter):
  """B A x for the layer `module` applied to x (without the layer's bias)."""
  a, b = adapter["a"], adapter["b"]
  dtype = module.dtype or x.dtype
  if isinstance(module, nn.Conv):
    down = module.clone(parent=None, features=a.shape[-1], use_bias=False)
    low = down.apply({"params": {"kernel": a.astype(module.param_dtype)}}, x)
  else:
    n_in = a.ndim - 1
    axes = (-1,) if isinstance(module, nn.Dense) else tuple(np.atleast_1d(module.axis))
    axes = tuple(ax % x.ndim for ax in axes)
    if len(axes) != n_in:
      raise ValueError(f"LoRA adapter of {module_path(module)} has {n_in} input axes, the "
                       f"layer contracts {len(axes)}")
    low = jnp.tensordot(x.astype(dtype), a.astype(dtype), axes=(axes, tuple(range(n_in))))
  return jnp.tensordot(low.astype(dtype), b.astype(dtype), axes=1)


@contextlib.contextmanager
def lora(adapters: Mapping[str, Mapping], factor, dropout: float = 0.0):
  """Within the context, every layer with an entry in `adapters` computes
  W x + factor·B A dropout(x) (factor = (α/r)·lora_scale; a scalar, traced or not).
  Dropout applies only when the network is called with a 'dropout' rng."""
  adapters = by_layer(adapters)

  def intercept(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, _LAYERS):
      return next_fun(*args, **kwargs)
    adapter = adapters.get(module_path(m))
    y = next_fun(*args, **kwargs)
    if adapter is None:
      return y
    x = args[0] if args else kwargs["inputs"]
    if dropout > 0 and m.scope is not None and m.scope.has_rng("dropout"):
      keep = jax.random.bernoulli(m.make_rng("dropout"), 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0.0).astype(x.dtype)
    return y + (factor * _low_rank(m, x, adapter)).astype(y.dtype)

  with nn.intercept_methods(intercept):
    yield


def lora_merge(params, adapters: Mapping[str, Mapping], factor):
  """The base parameters with every adapted kernel replaced by W + factor·ΔW: the
  adapted network as one set of weights (Hu et al. 2021, §4.1: no inference latency).
  An adapter whose layer is not in `params`, or of another shape, is an error."""
  flat = traverse_util.flatten_dict(params, sep="/")
  for path, adapter in by_layer(adapters).items():
    kernel = flat.get(_kernel(path))
    if kernel is None:
      raise ValueError(f"LoRA adapter for {path!r}: the network has no layer there")
    delta = _delta(adapter)
    if delta.shape != kernel.shape:
      raise ValueError(f"LoRA adapter for {path!r} has weight shape {delta.shape}; the "
                       f"layer's kernel is {kernel.shape}")
    flat[_kernel(path)] = (kernel + factor * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def lora_compose(weighted: Sequence[tuple[Mapping, float]]) -> dict:
  """One adapter (factor 1) equal to Σᵢ (adaptersᵢ, weightᵢ) where each weightᵢ already
  includes its factor (α/r)·scale: A = [A₁ … Aₙ] and B = [w₁B₁; …; wₙBₙ] along the rank,
  so B A x = Σᵢ wᵢ Bᵢ Aᵢ x exactly. Layers adapted by only some of them get only those."""
  weighted = [(by_layer(adapters), w) for adapters, w in weighted]
  paths = sorted({p for adapters, _ in weighted for p in adapters})
  out = {}
  for path in paths:
    parts = [(ad[path], w) for ad, w in weighted if path in ad]
    out[path] = {"a": jnp.concatenate([p["a"] for p, _ in parts], axis=-1),
                 "b": jnp.concatenate([w * p["b"] for p, w in parts], axis=0)}
  return nested(out)


@contextlib.contextmanager
def embedding_rows(rows: Mapping[str, jax.Array]):
  """Within the context, the embedding table (nn.Embed) at each path of `rows` has
  extra rows: id V + j (V its own size) looks up rows[path][j] [K, D] (textual
  inversion's placeholder tokens, Gal et al. 2022, §3). Ids < V are the table's own."""
  rows = dict(rows)

  def intercept(next_fun, args, kwargs, context):
    m = context.module
    extra = rows.get(module_path(m)) if isinstance(m, nn.Embed) else None
    if context.method_name != "__call__" or extra is None:
      return next_fun(*args, **kwargs)
    ids = args[0] if args else kwargs["inputs"]
    size = m.num_embeddings
    inside = ids < size
    y = next_fun(jnp.where(inside, ids, 0), *args[1:], **kwargs)
    new = jnp.take(extra, jnp.clip(ids - size, 0, extra.shape[0] - 1), axis=0)
    return jnp.where(inside[..., None], y, new.astype(y.dtype))

  with nn.intercept_methods(intercept):
    yield
