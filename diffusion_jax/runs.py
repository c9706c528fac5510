"""A finished run as a frozen component of another: its config, dataset info and the
parameters asked for, restored with their shardings onto a given mesh.

    component = runs.load("/tmp/clip_run", params="ema", mesh=mesh)
    component.config, component.info, component.params, component.step

One function serves every place a run serves another — the clip text encoder of
text-to-image, the guiding classifier, evaluation's feature networks, the models that
`diffusion-jax-sample` and `-evaluate` read, the frozen autoencoder of latent
diffusion, a distillation teacher and a fine-tuning base (`config.init`). It reads only what the
checkpoint says about itself (config, dataset info, array metadata), so it needs
neither the config file, nor the dataset, nor the task's code, and it restores only
the parameters asked for: never the optimizer state, which may be absent, large, or
of another optimizer. Each parameter gets the sharding the run's `config.mesh` rules
give it on `mesh` (so a model that needed FSDP to train is not replicated to sample).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from diffusion_jax import checkpoint, config as config_lib, data, parallel

__all__ = ["FORMAT", "PARAMS", "Component", "check_format", "dataset_info", "load",
           "metadata", "read"]

PARAMS = {"ema": "ema_params", "raw": "params"}

# The version of what a checkpoint says about itself (`metadata`). 0: checkpoints
# written before the version was recorded (same layout as 1, read as such). Raise it
# when the layout changes, and teach `check_format` (or `dataset_info`) to read the
# old one or say why not; config keys renamed since are read by `config.RENAMED`.
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Component:
  """A loaded run. params: the pytree asked for (jax.Arrays on `mesh`)."""
  workdir: str
  step: int
  config: Any
  info: data.DatasetInfo
  params: Any
  mesh: Mesh


def read(workdir: str, step: int | None = None):
  """(config, info, step) of a run's checkpoint `step` (default: the latest)."""
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    return _read(mngr, step)
  finally:
    mngr.close()


def _read(mngr, step):
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  if step not in mngr.all_steps():
    raise FileNotFoundError(f"no checkpoint of step {step} in {mngr.directory} (it has "
                            f"{sorted(mngr.all_steps())})")
  meta = checkpoint.read_meta(mngr, step)
  check_format(meta, f"{mngr.directory}/{step}")
  return config_lib.from_json(meta["config"]), dataset_info(meta), step


def check_format(meta: dict, where: str) -> int:
  """The metadata format of a checkpoint (0 when it has none); raises ValueError
  naming `where` for a format this version cannot read (a newer one)."""
  version = meta.get("format", 0)
  if not isinstance(version, int) or not 0 <= version <= FORMAT:
    raise ValueError(f"checkpoint {where} has metadata format {version!r}; this diffusion_jax "
                     f"reads formats 0..{FORMAT} (a newer version wrote it: upgrade "
                     "diffusion_jax to read it)")
  return version


def metadata(config, info: data.DatasetInfo) -> dict:
  """What a checkpoint says about itself (the training loop saves it with every
  checkpoint): the config and the dataset's info. `read` is its inverse."""
  return {"format": FORMAT, "config": config_lib.to_json(config),
          "dataset": {"image_shape": list(info.image_shape), "num_classes": info.num_classes,
                      "num_examples": info.num_examples, "kind": info.kind,
                      "label_captions": info.label_captions,
                      "latents": None if info.latents is None else dataclasses.asdict(info.latents)}}


def dataset_info(meta: dict) -> data.DatasetInfo:
  """The DatasetInfo recorded in a checkpoint's metadata."""
  d = meta["dataset"]
  latents = d.get("latents")
  return data.DatasetInfo(image_shape=tuple(d["image_shape"]), num_classes=d["num_classes"],
                          num_examples=d.get("num_examples", 0),
                          kind=d.get("kind", "image"),
                          label_captions=d.get("label_captions", False),
                          latents=None if latents is None else data.latent_info(latents))


def load(workdir: str, *, step: int | None = None, params: str = "ema",
         mesh: Mesh | None = None) -> Component:
  """Loads the run in `workdir` as a frozen component.

  step: checkpoint step (default: latest). params: 'ema' (the EMA parameters) or
  'raw' (the trained ones). mesh: where to place them (default: every device, with
  the base config's mesh, i.e. data parallel); shardings follow the run's own
  config.mesh rules on this mesh (its fsdp axis, if the mesh has one of size > 1).
  """
  if params not in PARAMS:
    raise ValueError(f"params={params!r}: expected one of {sorted(PARAMS)}")
  entry = PARAMS[params]
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    config, info, step = _read(mngr, step)
    mesh = parallel.make_mesh(config_lib.base().mesh) if mesh is None else mesh
    saved = mngr.item_metadata(step)["state"]
    tree = getattr(saved, "tree", saved)[entry]  # orbax's tree metadata, as a dict
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    # Shardings as the run's rules give them (paths as in the state: 'params/...').
    shardings = parallel.state_shardings(mesh, {"params": abstract}, config.mesh)["params"]
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        {entry: target}, restore_args={entry: ocp.checkpoint_utils.construct_restore_args(target)},
        partial_restore=True)))["state"][entry]
  finally:
    mngr.close()
  return Component(workdir=workdir, step=int(step), config=config, info=info,
                   params=restored, mesh=mesh)
