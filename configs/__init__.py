"""The shipped experiment configs, installed as the package `diffusion_jax_configs`
(pyproject.toml maps it to `configs/`), so that `diffusion-jax-train --config=quickstart`
works outside a source checkout (docs/configs.md). Every module here is a config file
with `get_config()`, except the ones in `HELPERS` (`common`: the shared blocks)."""
import importlib.resources

HELPERS = ("__init__", "common")


def names() -> list[str]:
  """The shipped configs' names (file names without `.py`), sorted."""
  return sorted(p.name[:-3] for p in importlib.resources.files(__name__).iterdir()
                if p.name.endswith(".py") and p.name[:-3] not in HELPERS)
