"""Latent diffusion: the diffusion task in the latent space of a frozen autoencoder run,
encoded in the step (config.latent.autoencoder) — trains and samples through the real
command line, decoded samples have the pixel shape, resume is exact, SDEdit and
inpainting take pixel inputs (inpainting keeps the known pixels exactly), and bad
settings are errors naming the key. The latent cache's path: tests/data/test_latents.py."""
import os

import jax
import numpy as np
import pytest

from conftest import (TINY_FLAGS, assert_trees_equal, run_cli, run_train_in_process,
                      tiny_config)
from diffusion_jax.training import loop, tasks


@pytest.fixture(scope="module")
def ae_run(data_dir, tmp_path_factory):
  """A 2-step latent autoencoder on the 8×8 digits: f = 2, 4×4×2 latents."""
  workdir = str(tmp_path_factory.mktemp("ae"))
  c = tiny_config(data_dir, **{
      "task": "autoencoder", "autoencoder.channels": (8, 16), "autoencoder.norm_groups": 4,
      "autoencoder.latent_channels": 2, "autoencoder.disc_weight": 0.0,
      "model.class_conditional": False, "train.num_steps": 2, "sample.per_class": 0})
  loop.train(c, workdir)
  return workdir


def _latent_config(data_dir, ae_run, **overrides):
  return tiny_config(data_dir, **{"latent.autoencoder": ae_run, "latent.scale": 0.5,
                                  "model.attn_resolutions": (2,), "train.num_steps": 4,
                                  "train.checkpoint_every": 2, **overrides})


def test_trains_samples_and_edits_through_the_command_line(data_dir, ae_run, tmp_path):
  workdir = str(tmp_path / "ldm")
  run_train_in_process([f"--config={os.path.join('configs', 'quickstart.py')}",
                        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
                        *TINY_FLAGS, "--config.model.attn_resolutions=(2,)",
                        "--config.train.num_steps=2", "--config.sample.per_class=1",
                        f"--config.latent.autoencoder={ae_run}", "--config.latent.scale=0.5"])
  assert os.listdir(os.path.join(workdir, "samples")) == ["step_0000002.png"]
  # One sample command, inpainting pixel inputs (real digits): decoded samples have the
  # pixel shape and the kept pixels are the input's, exactly.
  from diffusion_jax import data
  x, y = data.load_arrays("sklearn_digits", "test", data_dir)
  src, out = str(tmp_path / "in.npz"), str(tmp_path / "inp.npz")
  digits = np.round((x[:6] + 1) * 127.5).astype(np.uint8)
  np.savez(src, images=digits, labels=y[:6])
  run_cli("sample", [f"--workdir={workdir}", f"--output={out}", "--num_samples=6",
                     "--steps=3", f"--input={src}", "--inpaint=center", "--grid"])
  inp = np.load(out)["images"]
  assert inp.shape == (6, 8, 8, 1) and inp.dtype == np.uint8
  keep = np.ones((8, 8), bool)
  keep[2:6, 2:6] = False
  np.testing.assert_array_equal(inp[:, keep], digits[:, keep])
  assert not np.array_equal(inp[:, ~keep], digits[:, ~keep])


@pytest.mark.slow  # the editing wrapper is pixel space's (tests/samplers/test_editing.py)
def test_sdedit_from_pixel_inputs(data_dir, ae_run, tmp_path):
  """SDEdit in latent space: the pixel input is encoded, noised to t₀ and solved back;
  at t₀ → small the decoded result stays close to the input's reconstruction."""
  from diffusion_jax.training import generate
  workdir = str(tmp_path / "ldm")
  loop.train(_latent_config(data_dir, ae_run, **{"train.num_steps": 1}), workdir)
  x = np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  near, _, _ = generate.sample_run(workdir, 4, inputs=x, strength=0.05, num_steps=2)
  far, _, _ = generate.sample_run(workdir, 4, inputs=x, strength=1.0, num_steps=2)
  assert near.shape == far.shape == (4, 8, 8, 1)
  assert np.mean((near - far) ** 2) > 0


def test_resume_is_exact_and_the_latents_are_the_autoencoders(data_dir, ae_run, tmp_path):
  c = _latent_config(data_dir, ae_run, **{"sample.per_class": 0})  # no grids: steps only
  full = loop.train(c, str(tmp_path / "full"))
  loop.train(_latent_config(data_dir, ae_run, **{"train.num_steps": 2, "sample.per_class": 0}),
             str(tmp_path / "r"))
  resumed = loop.train(c, str(tmp_path / "r"))
  get = lambda s: jax.device_get((s.params, s.ema_params, s.opt_state))
  assert_trees_equal(get(resumed), get(full))
  info = loop.dataset_info(c)
  task = tasks.make(c, info)
  assert task.likelihood is None and task.generator.pictures
  # The denoiser sees 4×4×2 latents: its input conv has 2 channels.
  assert full.params["Conv_0"]["kernel"].shape[-2] == 2


def test_bad_settings_name_the_key(data_dir, ae_run):
  info = loop.dataset_info(tiny_config(data_dir))
  with pytest.raises(ValueError, match="config.latent.scale"):
    tasks.make(_latent_config(data_dir, ae_run, **{"latent.scale": None}), info)
  with pytest.raises(ValueError, match="superres"):
    tasks.make(_latent_config(data_dir, ae_run, **{"superres.low_res": 4}), info)
  with pytest.raises(ValueError, match="preset"):
    tasks.make(_latent_config(data_dir, "/nonexistent/vae.safetensors"), info)
  with pytest.raises(FileNotFoundError, match="neither a run directory"):
    tasks.make(_latent_config(data_dir, "/nonexistent/run"), info)


@pytest.mark.slow  # ~30 s; training on a cache and decoding its grid: test_latent_recipes.py
def test_trains_on_a_latent_cache_and_samples_pixels(data_dir, ae_run, tmp_path):
  """The cache path: the autoencoder and the measured scale come from the cache's
  metadata (no config.latent keys), random flips draw the flipped posteriors, samples
  decode to pixels through sample_run, and a classifier trained on the same latents
  guides them."""
  from diffusion_jax import data
  from diffusion_jax.training import generate
  from diffusion_jax.training.tasks import latent
  autoencoder, params = latent.load_autoencoder(ae_run)
  cache = str(tmp_path / "cache")
  data.latents.write_split(cache, "sklearn_digits", "train", data_dir,
                           lambda p, x, y: autoencoder.encode(p, x), params, flips=True,
                           batch_size=64, autoencoder=ae_run)
  c = tiny_config(data_dir, **{"data.name": cache, "data.random_flip": True,
                               "model.attn_resolutions": (2,), "train.num_steps": 2})
  info = loop.dataset_info(c)
  assert info.kind == "latents" and info.image_shape == (4, 4, 2)
  space = latent.space(c, info)
  assert space.cached and space.scale == pytest.approx(info.latents.data_scale)
  assert space.shift == pytest.approx(info.latents.data_shift)
  loop.train(c, str(tmp_path / "run"))
  images, labels, comp = generate.sample_run(str(tmp_path / "run"), 4, num_steps=2)
  assert images.shape == (4, 8, 8, 1) and comp.info.latents.autoencoder == ae_run
  # Classifier guidance in the latent space: a noise-conditional classifier of the same
  # cache (and so the same scaled latents and path) guides the latent model.
  cls = tiny_config(data_dir, **{"task": "classifier", "data.name": cache,
                                 "model.attn_resolutions": (2,), "train.num_steps": 2})
  assert tasks.make(cls, info).features is None  # it classifies latents, not pixels
  loop.train(cls, str(tmp_path / "cls"))
  guided, _, _ = generate.sample_run(str(tmp_path / "run"), 4, [1, 2], num_steps=2,
                                     classifier_workdir=str(tmp_path / "cls"),
                                     classifier_scale=3.0)
  assert guided.shape == (4, 8, 8, 1) and not np.allclose(guided, images)
