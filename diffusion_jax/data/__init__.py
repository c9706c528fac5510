"""Image datasets: TFDS builders and the deterministic grain input pipeline."""

from diffusion_jax.data.builders import EMBEDDED, prepare
from diffusion_jax.data.pipeline import (
    DatasetInfo,
    get_source,
    load_arrays,
    make_train_iterator,
    to_model_image,
)

__all__ = [
    "EMBEDDED",
    "DatasetInfo",
    "get_source",
    "load_arrays",
    "make_train_iterator",
    "prepare",
    "to_model_image",
]
