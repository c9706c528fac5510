"""Image datasets: TFDS builders and the deterministic grain input pipeline."""

from diffusion_jax.data.builders import EMBEDDED, prepare
from diffusion_jax.data.pipeline import (
    DatasetInfo,
    TextOptions,
    features,
    get_source,
    load_arrays,
    load_text_arrays,
    make_train_iterator,
    text_options,
    to_model_image,
)

__all__ = [
    "EMBEDDED",
    "DatasetInfo",
    "TextOptions",
    "features",
    "get_source",
    "load_arrays",
    "load_text_arrays",
    "make_train_iterator",
    "prepare",
    "text_options",
    "to_model_image",
]
