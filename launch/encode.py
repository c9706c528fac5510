r"""Encode a dataset split once with a frozen autoencoder: the latent cache that latent
diffusion trains on (`diffusion_jax.data.latents`, docs/latent_diffusion.md).

  diffusion-jax-encode --autoencoder=/runs/ae --dataset=sklearn_digits \
      --data_dir=/data/tfds --split=train --output_dir=/data/latents/digits_ae \
      [--flips] [--batch_size=64] [--chunk_size=1024] [--dtype=float32]
  diffusion-jax-encode --autoencoder=/weights/sd_vae.safetensors --preset=sd \
      --dataset=imagenet2012 --image_size=256 --flips --output_dir=/data/latents/in256_sd

--autoencoder is the workdir of a trained run with an encoder (config.task 'autoencoder'
or 'vae') or a diffusers AutoencoderKL weight file of architecture --preset, loaded by
`training.tasks.latent.load_autoencoder`. --dataset, --data_dir, --split and
--image_size name the pixels as config.data.name, .data_dir, .split and .image_size
would. Train on the result with config.data.name=<--output_dir> (a path; or, written to
<data_dir>/<name>/1.0.0, data.name=<name> with data.data_dir=<data_dir>).

Re-running the same command resumes an interrupted run (finished chunks are kept) and
does nothing once the cache is complete. Multi-host: every process runs the command
(--coordinator_address, --num_processes, --process_id as for diffusion-jax-train) with
an --output_dir on a filesystem all of them see.
"""
from __future__ import annotations

import os

import jax
from absl import app, flags

from diffusion_jax import config as config_lib, data, io, parallel
from diffusion_jax.data import latents
from diffusion_jax.training.tasks import latent
from diffusion_jax_launch import common

_AUTOENCODER = flags.DEFINE_string(
    "autoencoder", None, "Workdir of a trained autoencoder/vae run, or a diffusers "
    "AutoencoderKL .safetensors file (with --preset).")
_PRESET = flags.DEFINE_enum("preset", "", ["", "sd", "sdxl", "flux"],
                            "Architecture of a weight file --autoencoder.")
_DATASET = flags.DEFINE_string("dataset", None, "The pixel dataset (as config.data.name): a "
                               "TFDS name in --data_dir, or a dataset directory.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (as config.data.data_dir).")
_SPLIT = flags.DEFINE_string("split", "train", "Split to encode (as config.data.split).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Center-crop and resize to this size "
                                   "(as config.data.image_size; 0: native).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "The cache's directory (created).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per encoder call, over all "
                                   "devices of all processes.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 1024, "Examples per chunk: the unit of "
                                   "resuming, and one shard file.")
_FLIPS = flags.DEFINE_bool("flips", False, "Also store the posterior of every image's "
                           "horizontal flip (for config.data.random_flip).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(latents.DTYPES),
                           "Storage of mean and std (float16 halves the disk).")
flags.mark_flags_as_required(["autoencoder", "dataset", "output_dir"])
common.integer(_IMAGE_SIZE, 0)
common.integer(_BATCH_SIZE, 1)
common.integer(_CHUNK_SIZE, 1)


def _spec(value: str) -> str:
  """The autoencoder spec as recorded: local paths made absolute (training reads it from
  another directory), cloud URIs as given."""
  return os.fspath(io.path(os.path.expanduser(value)))


def encode_split():
  """Loads the autoencoder and writes the cache; returns its DatasetInfo."""
  mesh = parallel.make_mesh(config_lib.base().mesh)
  spec = _spec(_AUTOENCODER.value)
  autoencoder, params = latent.load_autoencoder(spec, _PRESET.value, mesh=mesh)
  _, pixels = data.get_source(_DATASET.value, _SPLIT.value, _DATA_DIR.value,
                              image_size=_IMAGE_SIZE.value or None)
  if autoencoder.image_shape is not None and tuple(autoencoder.image_shape) != pixels.image_shape:
    raise ValueError(f"--autoencoder={spec} encodes images of shape "
                     f"{tuple(autoencoder.image_shape)}, but --dataset={_DATASET.value} gives "
                     f"{pixels.image_shape} (set --image_size, or encode the data it was "
                     "trained on)")
  conditional = autoencoder.conditional
  if conditional and not pixels.num_classes:
    raise ValueError(f"--autoencoder={spec} is class-conditional, but --dataset="
                     f"{_DATASET.value} has no labels")

  def encode(p, images, labels):
    return autoencoder.encode(p, images, labels if conditional else None)

  return latents.write_split(
      _OUTPUT_DIR.value, _DATASET.value, _SPLIT.value, _DATA_DIR.value, encode, params,
      image_size=_IMAGE_SIZE.value, flips=_FLIPS.value, dtype=_DTYPE.value,
      batch_size=_BATCH_SIZE.value, chunk_size=_CHUNK_SIZE.value, mesh=mesh,
      autoencoder=spec, preset=_PRESET.value, scale=autoencoder.scale,
      shift=autoencoder.shift)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    info = encode_split()
  except common.USER_ERRORS as e:
    common.fail(e)
  if jax.process_index() == 0:
    lat = info.latents
    print(f"Wrote {info.num_examples} latents {info.image_shape} of {lat.source} "
          f"{lat.split} {lat.image_shape}{' (+ flips)' if lat.flips else ''} to "
          f"{_spec(_OUTPUT_DIR.value)}: data_scale {lat.data_scale:.6g} "
          f"(autoencoder scale {lat.scale:g}, shift {lat.shift:g})")


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
