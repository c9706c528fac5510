r"""Sample from a trained run (EMA parameters by default).

  diffusion-jax-sample --workdir=/tmp/run --num_samples=64 --output=samples.npz \
      [--labels=0,1,2] [--sampler=ddim] [--steps=50] [--guidance=2] [--seed=0] [--grid]

Editing and conditioning, with --input=FILE.npz (`images` uint8 [M, H, W, C], cycled
to N; its `labels`, where >= 0, are used unless --labels is given):
  --strength=0.5             SDEdit: noise the inputs to t₀ = 0.5 and solve back
  --inpaint=center           regenerate a region (center|left|right|top|bottom) or the
                             0s of a mask .npz (`mask` [H, W] or [N, H, W], 1 = keep)
  super-resolution runs      --input is the low-resolution stage (e.g. another run's
                             samples: a cascade), downsampled if larger
  --classifier_workdir=DIR --classifier_scale=S   classifier guidance by a run of the
                             classifier task (same path and data)

GAN and VAE runs: --interpolate=linear|slerp [--interpolation_points=8] writes latent
interpolation strips instead: row r goes from z0 to z1 (drawn from --seed and r) with
label r of --labels (cycled to --num_samples rows): `images` uint8 [R, P, H, W, C] and,
with --grid, a PNG with one strip per row.

Fine-tuning: --lora_scale=S scales a LoRA run's adapters (0 = the base model);
--adapter=FILE[:WEIGHT] (repeatable) loads adapter files of fine-tuning runs
(<workdir>/adapters/<step>.safetensors) onto this run, LoRA adapters composed with their
weights; prompts may then use the placeholders <v0>… of a textual-inversion file.

Writes `images` (uint8 [N, H, W, C]), `values` (the model's float32 output, e.g. the 2-D
points of a ring8 GAN) and `labels` (int32 [N]; -1 for unconditional models) to the .npz, and with --grid a PNG beside it. Deterministic for a given seed,
whatever the number of devices.
"""
import io as pyio
import os

import jax
import numpy as np
from absl import app, flags

from diffusion_jax import io, runs
from diffusion_jax.training import generate
from diffusion_jax_launch import common

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by diffusion-jax-train.")
_NUM = flags.DEFINE_integer("num_samples", 64, "Number of samples N.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz path (local or a cloud URI).")
_LABELS = flags.DEFINE_list("labels", None, "Class labels, cycled to N (default: 0..C-1 cycled).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: config.sample.sampler).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG weight w (default: config.sample.guidance).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_GRID = flags.DEFINE_bool("grid", False, "Also write a PNG grid next to --output.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_RAW = flags.DEFINE_bool("raw_params", False, "Use the raw parameters instead of the EMA.")
_INPUT = flags.DEFINE_string("input", None, "Input images .npz (SDEdit, inpainting, "
                             "super-resolution).")
_STRENGTH = flags.DEFINE_float("strength", 1.0, "SDEdit t0 in (0, 1]; 1 = from pure noise.")
_INPAINT = flags.DEFINE_string("inpaint", None, "Region to regenerate, or a mask .npz.")
_CLS_WORKDIR = flags.DEFINE_string("classifier_workdir", None,
                                   "Classifier run for classifier guidance.")
_CLS_SCALE = flags.DEFINE_float("classifier_scale", 1.0, "Classifier guidance scale s.")
_PROMPTS = flags.DEFINE_multi_string(
    "prompt", None, "Caption(s) of a text-conditional run, cycled to N (repeatable; "
    "default: the digit caption of each label).")
_ADAPTERS = flags.DEFINE_multi_string(
    "adapter", None, "FILE[:WEIGHT]: a fine-tuning run's adapter file (<workdir>/adapters/"
    "<step>.safetensors: LoRA adapters, placeholder embeddings) loaded onto this run; "
    "repeatable, LoRA adapters compose with their weights (default 1).")
_LORA_SCALE = flags.DEFINE_float("lora_scale", None, "s of W + (α/r)·s·BA for a LoRA run or "
                                 "the --adapter files (default: config.sample.lora_scale; "
                                 "0 = the base model).")
_INTERPOLATE = flags.DEFINE_enum("interpolate", None, ["linear", "slerp"],
                                 "GAN and VAE runs: latent interpolation strips (see above).")
_POINTS = flags.DEFINE_integer("interpolation_points", 8, "Images per interpolation strip.")
flags.mark_flags_as_required(["workdir", "output"])
common.integer(_NUM, 1)
common.int_list(_LABELS, 0)
common.integer(_STEPS, 1)
common.number(_GUIDANCE)
common.seed(_SEED)
common.integer(_STEP, 0)
common.number(_STRENGTH, 0, 1, open_low=True)
common.number(_CLS_SCALE)
common.adapter_specs(_ADAPTERS)
common.number(_LORA_SCALE)
common.integer(_POINTS, 2)


def _read_npz(path: str, key: str) -> np.ndarray:
  """Array `key` of the .npz `path` (local or a cloud URI)."""
  try:
    with io.path(path).open("rb") as fh, np.load(fh) as f:
      if key not in f:
        raise KeyError(f"{path} has no array {key!r} (it has {sorted(f.files)})")
      return f[key]
  except (OSError, ValueError) as e:
    raise OSError(f"cannot read {path}: {e}") from e


def _write_npz(path: str, **arrays) -> str:
  """Writes `arrays` as the .npz `path` (".npz" appended when missing, as numpy does;
  atomically; local or a cloud URI); returns the path written."""
  buf = pyio.BytesIO()
  np.savez(buf, **arrays)
  return os.fspath(io.write_atomic(path if path.endswith(".npz") else path + ".npz",
                                   buf.getvalue()))


def _inputs():
  """(images float [-1, 1] or None, labels list or None, inpaint region or mask)."""
  images = labels = None
  if _INPUT.value:
    raw = _read_npz(_INPUT.value, "images")
    if raw.dtype != np.uint8:
      raise ValueError(f"{_INPUT.value}: `images` must be uint8 [N, H, W, C], got {raw.dtype}")
    images = io.from_uint8(raw)
    with io.path(_INPUT.value).open("rb") as fh, np.load(fh) as f:
      if "labels" in f and np.all(f["labels"] >= 0):
        labels = f["labels"].tolist()
  inpaint = _INPAINT.value
  if inpaint and inpaint.endswith(".npz"):
    inpaint = _read_npz(inpaint, "mask")
  return images, labels, inpaint


def _interpolation_strips():
  """(images uint8 [R, P, H, W, C], labels [R], checkpoint step) of a run whose
  generator interpolates latents (GANs, VAEs)."""
  comp = runs.load(_WORKDIR.value, step=_STEP.value, params="raw" if _RAW.value else "ema")
  gen = generate.generator_of(comp)
  if gen.interpolate is None:
    raise ValueError(f"--interpolate needs a run that interpolates latents (a GAN or VAE); "
                     f"{_WORKDIR.value} is a config.task={comp.config.task!r} run")
  labels = generate.resolve_labels(gen.num_classes, _NUM.value, _LABELS.value)
  strips = jax.jit(lambda t, l: gen.interpolate(
      t, jax.random.key(_SEED.value), l, _POINTS.value, _INTERPOLATE.value))(comp.params, labels)
  return io.to_uint8(np.asarray(strips)), labels, comp.step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  if _INTERPOLATE.value:
    try:
      strips, labels, step = _interpolation_strips()
    except common.USER_ERRORS as e:
      common.fail(e)
    if jax.process_index() == 0:
      output = _write_npz(_OUTPUT.value, images=strips, labels=labels)
      print(f"Wrote {len(strips)} interpolation strips (checkpoint step {step}) to {output}")
      if _GRID.value:
        flat = strips.reshape((-1,) + strips.shape[2:])
        png = io.save_png(os.path.splitext(output)[0] + ".png",
                          io.grid(flat, len(strips)), upscale=max(1, 64 // flat.shape[1]))
        print(f"Wrote strips to {png}")
    return
  try:
    inputs, input_labels, inpaint = _inputs()
    images, labels, comp = generate.sample_run(
        _WORKDIR.value, _NUM.value, _LABELS.value or input_labels, seed=_SEED.value,
        sampler=_SAMPLER.value, num_steps=_STEPS.value, guidance=_GUIDANCE.value,
        step=_STEP.value, use_ema=not _RAW.value, inputs=inputs, inpaint=inpaint,
        strength=_STRENGTH.value, classifier_workdir=_CLS_WORKDIR.value,
        classifier_scale=_CLS_SCALE.value, prompts=_PROMPTS.value,
        adapters=common.adapter_files(_ADAPTERS.value), lora_scale=_LORA_SCALE.value)
  except common.USER_ERRORS as e:
    common.fail(e)
  if jax.process_index() == 0:
    values, images, step = np.asarray(images, np.float32), io.to_uint8(images), comp.step
    output = _write_npz(_OUTPUT.value, images=images, labels=labels, values=values)
    print(f"Wrote {len(images)} samples (checkpoint step {step}) to {output}")
    if _GRID.value and images.ndim == 4 and images.shape[-1] in (1, 3):  # pictures
      rows = int(np.ceil(np.sqrt(len(images))))
      png = io.save_png(os.path.splitext(output)[0] + ".png", io.grid(images, rows),
                        upscale=max(1, 64 // images.shape[1]))
      print(f"Wrote grid to {png}")


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
