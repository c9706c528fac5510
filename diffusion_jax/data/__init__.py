"""Image datasets: TFDS builders, the deterministic grain input pipeline, latent
caches (`latents`: a split encoded once by a frozen autoencoder) and few-image
datasets (`images`: a folder of pictures or an .npz written as a dataset)."""

from diffusion_jax.data.builders import EMBEDDED, prepare
from diffusion_jax.data.pipeline import (
    DatasetInfo,
    LatentInfo,
    TextOptions,
    features,
    get_source,
    is_path,
    latent_info,
    pictures,
    load_arrays,
    load_text_arrays,
    make_train_iterator,
    text_options,
    to_model_image,
)
from diffusion_jax.data import images, latents

__all__ = [
    "EMBEDDED",
    "DatasetInfo",
    "LatentInfo",
    "TextOptions",
    "features",
    "get_source",
    "images",
    "is_path",
    "latent_info",
    "pictures",
    "latents",
    "load_arrays",
    "load_text_arrays",
    "make_train_iterator",
    "prepare",
    "text_options",
    "to_model_image",
]
