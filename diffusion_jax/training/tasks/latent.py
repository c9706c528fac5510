"""Frozen autoencoders as components: the one way a latent-diffusion run, the latent
cache (`diffusion-jax-encode`) and evaluation get an encoder and decoder.

    autoencoder, params = latent.load_autoencoder("/runs/ae")              # a trained run
    autoencoder, params = latent.load_autoencoder("sd_vae.safetensors", "sd")  # published
    mean, std = autoencoder.encode(params, x)          # the posterior of the raw latent
    x = autoencoder.decode(params, z)

A trained run (config.task 'autoencoder' or 'vae', or any task with the `autoencoder`
capability) is loaded with `runs.load` (its EMA parameters, only those); a published
diffusers `AutoencoderKL` file with `nets.autoencoder.load_pretrained` and its preset's
scale and shift (Rombach et al. 2022 §4.3.2: z_scaled = scale·(z − shift)).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import io, runs
from diffusion_jax.nets import autoencoder as ae_nets
from diffusion_jax.training import tasks
from diffusion_jax.training.tasks.base import Autoencoder

__all__ = ["WEIGHT_SUFFIXES", "LatentSpace", "frozen", "is_file", "load_autoencoder",
           "published", "space"]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".npz")


def is_file(spec: str) -> bool:
  """True when `spec` names a weight file (by its suffix), not a run directory."""
  return os.fspath(spec).endswith(WEIGHT_SUFFIXES)


def published(module, scale: float, shift: float, image_shape=None) -> Autoencoder:
  """The Autoencoder capability of a published AutoencoderKL `module` (variables as
  params). image_shape (H, W, C) fixes the shapes; None: resolution-free (both None)."""
  f = 2 ** (len(module.block_out_channels) - 1)
  latent_shape = None
  if image_shape is not None:
    image_shape = tuple(image_shape)
    latent_shape = (image_shape[0] // f, image_shape[1] // f, module.latent_channels)

  def encode(params, x, labels=None):
    mean, logvar = module.apply(params, x, method="encode")
    return mean, jnp.exp(0.5 * logvar)

  def decode(params, z, labels=None):
    return jnp.clip(module.apply(params, z, method="decode"), -1.0, 1.0)

  return Autoencoder(encode=encode, decode=decode, image_shape=image_shape,
                     latent_shape=latent_shape, scale=float(scale), shift=float(shift))


def load_autoencoder(spec: str, preset: str = "", mesh=None, image_shape=None):
  """(Autoencoder, params) of `spec`: a workdir of a run whose task has the
  `autoencoder` capability (its EMA parameters, placed on `mesh` with the run's
  shardings), or a diffusers AutoencoderKL weight file (.safetensors; .pth/.npz) of
  architecture `preset` (sd | sdxl | flux), its parameters replicated on `mesh`'s
  devices (default device without a mesh). Never downloads."""
  if not spec:
    raise ValueError("no autoencoder given (config.latent.autoencoder / --autoencoder): "
                     "a workdir of an autoencoder or vae run, or a .safetensors file")
  if is_file(spec):
    if not preset:
      raise ValueError(f"{spec} is a weight file: say its architecture with "
                       f"config.latent.preset / --preset (one of {sorted(ae_nets.PRESETS)})")
    module, variables, scale, shift = ae_nets.load_pretrained(spec, preset)
    if mesh is not None:
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      params = jax.device_put(variables, sharding)
    else:
      params = jax.tree.map(jnp.asarray, variables)
    return published(module, scale, shift, image_shape), params
  if preset:
    raise ValueError(f"preset={preset!r} applies to a weight file, not to the run {spec}")
  if not io.path(spec).is_dir():
    raise FileNotFoundError(f"{spec}: neither a run directory nor a weight file "
                            f"({', '.join(WEIGHT_SUFFIXES)})")
  comp = runs.load(spec, mesh=mesh)
  autoencoder = tasks.make(comp.config, comp.info).autoencoder
  if autoencoder is None:
    raise ValueError(f"{spec} is a config.task={comp.config.task!r} run, which has no "
                     "encoder and decoder (train one with config.task='autoencoder' or 'vae')")
  return autoencoder, comp.params


@functools.lru_cache(maxsize=4)
def frozen(spec: str, preset: str = "", image_shape=None):
  """(Autoencoder, numpy params) for closing over in a compiled step (compile-time
  constants, like the clip text encoder's); concrete even when first asked for inside
  a trace. Large autoencoders belong in the latent cache instead."""
  with jax.ensure_compile_time_eval():
    autoencoder, params = load_autoencoder(spec, preset, image_shape=image_shape)
    return autoencoder, jax.tree.map(np.asarray, jax.device_get(params))


_EPS = 0x1A7E  # fold-in constant of the latent draw z = mean + std·ε


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """Where a latent-diffusion model lives: a frozen autoencoder and the normalisation
  z_scaled = scale·(z − shift) that gives its latents about unit variance (Rombach et
  al. 2022, §4.3.2).

  autoencoder, params: the frozen component (params are numpy: closed over);
  scale, shift: the normalisation in use;
  pixel_info: the DatasetInfo of the pictures it decodes to (conditioning, grids);
  latent_info: the DatasetInfo of the latents the denoiser sees;
  cached: the batches hold the posterior ("mean", "std", from `diffusion-jax-encode`),
    else pixels ("image") encoded in the step.
  """
  autoencoder: Autoencoder
  params: Any
  scale: float
  shift: float
  pixel_info: Any
  latent_info: Any
  cached: bool

  def draw(self, batch, keys, params=None):
    """z₀ [B, *latent_shape] of a batch: z = mean + std·ε with ε = N(fold_in(key_i, ·))
    (a fresh draw every step), scaled. Cached batches give the posterior; pixel
    batches are encoded here."""
    if self.cached:
      mean, std = batch["mean"].astype(jnp.float32), batch["std"].astype(jnp.float32)
    else:
      mean, std = self.autoencoder.encode(self._params(params), batch["image"],
                                          _labels(self, batch))
      mean, std = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(std)
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _EPS), mean.shape[1:]))(keys)
    return self.scale * (mean + std * eps - self.shift)

  def _params(self, params):
    return self.params if params is None else params

  def encode(self, images, labels=None, params=None):
    """Pixels [N, H, W, C] in [-1, 1] → the scaled posterior means [N, *latent_shape]
    (the deterministic latents of SDEdit's and inpainting's inputs). params: the
    autoencoder's (default: the closed-over `self.params`, compile-time constants)."""
    mean, _ = self.autoencoder.encode(self._params(params), images, labels)
    return self.scale * (mean - self.shift)

  def decode(self, z, labels=None, params=None):
    """Scaled latents [N, *latent_shape] → pixels [N, H, W, C] in [-1, 1]."""
    return self.autoencoder.decode(self._params(params), z / self.scale + self.shift, labels)

  def mask(self, mask):
    """A pixel mask [N, H, W, 1|C] (1 = keep) → the latent grid's [N, h, w, 1]: a latent
    cell is kept only where every pixel it covers is (nothing of the region to
    regenerate leaks into the kept latents; the paste in pixel space restores the
    known pixels exactly)."""
    n, H, W = mask.shape[:3]
    h, w = self.latent_info.image_shape[:2]
    m = jnp.min(mask, axis=-1).reshape(n, h, H // h, w, W // w)
    return jnp.min(m, axis=(2, 4))[..., None]


def _labels(space, batch):
  return batch["label"].astype(jnp.int32) if space.autoencoder.conditional else None


def space(config, info) -> LatentSpace | None:
  """The latent space of a diffusion run: None in pixel space (no
  config.latent.autoencoder and a dataset of pictures), else from the latent cache
  `info.latents` (`data.latents`) or config.latent.autoencoder (encoded in the step).

  scale/shift: config.latent.scale/shift when set; else the autoencoder's own (a
  published one's) when it has them; else the cache's measured 1/std and mean (zero
  mean, unit variance). A trained autoencoder encoded on the fly needs
  config.latent.scale (`diffusion-jax-encode` measures it; shift then defaults to 0)."""
  cached = info.kind == "latents"
  spec, preset = config.latent.autoencoder, config.latent.preset
  if not cached and not spec:
    return None
  lat = getattr(info, "latents", None)
  if cached:
    if spec and spec != lat.autoencoder:
      raise ValueError(f"config.latent.autoencoder={spec!r} differs from the autoencoder "
                       f"the latent cache {config.data.name!r} was encoded with "
                       f"({lat.autoencoder!r}); leave it empty to use the cache's")
    spec, preset = lat.autoencoder, lat.preset
    pixel_shape = tuple(lat.image_shape)
  else:
    pixel_shape = tuple(info.image_shape)
  autoencoder, params = frozen(spec, preset, pixel_shape)
  own = autoencoder.scale != 1.0 or autoencoder.shift != 0.0
  scale, shift = config.latent.scale, config.latent.shift
  if scale is None:
    if own:
      scale = autoencoder.scale
    elif cached:
      scale = lat.data_scale
    else:
      raise ValueError(f"config.latent.scale: the autoencoder {spec} has no scale factor of "
                       "its own; set it (diffusion-jax-encode measures 1/std of the data's "
                       "latents), or train on its latent cache")
  if shift is None:
    shift = autoencoder.shift if own or config.latent.scale is not None else (
        lat.data_shift if cached else 0.0)
  pixel_info = dataclasses.replace(info, image_shape=pixel_shape, kind="image")
  if cached:
    pixel_info = dataclasses.replace(pixel_info, latents=None)
  latent_info = dataclasses.replace(info, image_shape=tuple(autoencoder.latent_shape),
                                    kind="latents")
  return LatentSpace(autoencoder=autoencoder, params=params, scale=float(scale),
                     shift=float(shift), pixel_info=pixel_info, latent_info=latent_info,
                     cached=cached)
