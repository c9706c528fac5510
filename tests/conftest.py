"""Test setup: 8 virtual CPU devices for in-process tests, a shared TFDS data dir, and
a tiny config that compiles fast."""
import os

# Before JAX is imported anywhere: 8 virtual CPU devices (sharding tests need them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One prepared TFDS directory (embedded datasets) for the whole session."""
  from diffusion_jax import data
  d = str(tmp_path_factory.mktemp("tfds"))
  data.prepare("sklearn_digits", d)
  return d


def tiny_config(data_dir: str, **overrides):
  """A quickstart-shaped config with a tiny U-Net: compiles in seconds."""
  from diffusion_jax.config import base
  c = base()
  c.data.name = "sklearn_digits"
  c.data.data_dir = data_dir
  c.data.batch_size = 16
  c.model.channels = 8
  c.model.channel_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.num_heads = 2
  c.sample.num_steps = 4
  c.sample.per_class = 1
  c.optim.warmup_steps = 2
  c.train.num_steps = 8
  c.train.log_every = 2
  c.train.checkpoint_every = 4
  c.train.sample_every = 0
  for k, v in overrides.items():
    c.update_from_flattened_dict({k: v})
  return c


# Flags for the command line with the same tiny model.
TINY_FLAGS = [
    "--config.data.batch_size=16", "--config.model.channels=8",
    "--config.model.channel_mult=(1,2)", "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=(4,)", "--config.model.num_heads=2",
    "--config.sample.num_steps=4", "--config.sample.per_class=1",
    "--config.optim.warmup_steps=2", "--config.train.log_every=2",
]
