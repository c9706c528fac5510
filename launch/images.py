r"""Write a few-image dataset (`diffusion_jax.data.images`, docs/data.md): a folder of
PNG / JPEG files or an .npz of images as a prepared TFDS dataset directory.

  diffusion-jax-images --input=photos/ --output=/data/my_dog [--image_size=64]
  diffusion-jax-images --input=/tmp/class_digit.npz --caption="a digit" \
      --output=/tmp/class_digit

A folder's captions come from its metadata.jsonl ({"file_name", "text"[, "label"]} per
line, Hugging Face imagefolder's) or a <stem>.txt beside each image, else --caption;
an .npz holds "images" (uint8 [N, H, W, C] or float in [-1, 1], e.g. what
diffusion-jax-sample --output=x.npz writes) and optionally "labels" and "captions".
Train on it with config.data.name=<--output> (and config.text.feature='caption' for
its captions), or use it as config.data.paired_name.
"""
from __future__ import annotations

import os

from absl import app, flags

from diffusion_jax import io
from diffusion_jax.data import images
from diffusion_jax_launch import common

_INPUT = flags.DEFINE_string("input", None, "A folder of .png / .jpg files, or an .npz.")
_OUTPUT = flags.DEFINE_string("output", None, "The dataset's directory (created; must be "
                              "new or empty).")
_CAPTION = flags.DEFINE_string("caption", None, "The caption of every image (inputs "
                               "without captions of their own).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Center-crop and resize to this size "
                                   "(0: keep the size, the same for all images).")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 0, "Classes of the 'label' feature "
                                    "(0: max label + 1); needs labels.")
flags.mark_flags_as_required(["input", "output"])
common.integer(_IMAGE_SIZE, 0)
common.integer(_NUM_CLASSES, 0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  try:
    info = images.write(_INPUT.value, _OUTPUT.value, caption=_CAPTION.value,
                        image_size=_IMAGE_SIZE.value or None, num_classes=_NUM_CLASSES.value)
  except common.USER_ERRORS as e:
    common.fail(e)
  path = os.fspath(io.path(os.path.expanduser(_OUTPUT.value)))
  print(f"Wrote {info.num_examples} images {info.image_shape}"
        + (f" with {info.num_classes} classes" if info.num_classes else "")
        + f" to {path} (config.data.name={path})")


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
  run()
