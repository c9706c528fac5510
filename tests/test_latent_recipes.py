"""The latent-diffusion recipes: configs/imagenet256_dit_xl2.py (DiT-XL/2 on the SD
autoencoder's ImageNet-256 latents, Peebles & Xie 2023) and configs/mnist5k_latent_t2i.py
(text-to-image DiT on a latent cache).

The DiT-XL/2 network is built at full size abstractly (jax.eval_shape: the paper's 675M
parameters); both recipes then train one real step through diffusion-jax-train's entry
point on a latent cache of the embedded digits (16×16 pixels, encoded by a 1-step
autoencoder run into 8×8×4 latents, with flips), shrunk only in the model's size and
the batch: the recipes' own path, prediction, optimizer, dtypes, guidance, flips and
latent scale stay in force, and the end-of-run grid decodes the samples to pixels."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, read_metrics, run_train_in_process, tiny_config
from diffusion_jax import config as config_lib, data, parallel
from diffusion_jax.data import latents
from diffusion_jax.training import loop, tasks
from diffusion_jax.training.tasks import diffusion, latent

from diffusion_jax_configs import digits_clip
from diffusion_jax_configs import imagenet256_dit_xl2 as imagenet_recipe
from diffusion_jax_configs import mnist5k_latent_t2i as t2i_recipe

IMAGENET = os.path.join(ROOT, "configs", "imagenet256_dit_xl2.py")
T2I = os.path.join(ROOT, "configs", "mnist5k_latent_t2i.py")
# One step of a recipe with its model shrunk (the rest of the config is the recipe's).
ONE_STEP = ["--config.data.batch_size=8", "--config.data.num_threads=0",
            "--config.model.hidden_size=32", "--config.model.depth=1",
            "--config.model.num_heads=2", "--config.train.num_steps=1",
            "--config.train.checkpoint_every=1", "--config.train.log_every=1",
            "--config.sample.per_class=1", "--config.sample.num_steps=2"]


def test_dit_xl2_recipe_has_the_papers_675m_parameters():
  """DiT-XL/2 on [1, 32, 32, 4] latents, 1000 classes (+ the null class): 674,816,272
  parameters, 0.03 % under the paper's 675M. The official PyTorch model's count,
  675,129,632, adds its learned-Σ output channels (4 more per patch pixel: 1152·16 + 16)
  and its fixed position embedding, a frozen nn.Parameter there (256 tokens × 1152) and
  a constant here."""
  c = imagenet_recipe.get_config()
  config_lib.validate(c)
  info = data.DatasetInfo(image_shape=(32, 32, 4), num_classes=1000, num_examples=0)
  net = diffusion.model(c, info)
  x = jnp.zeros((1, 32, 32, 4))
  params = jax.eval_shape(lambda k: net.init(k, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)),
                          jax.random.key(0))["params"]
  leaves = jax.tree.leaves(params)
  n = sum(int(np.prod(p.shape)) for p in leaves)
  assert abs(n - 675e6) / 675e6 < 0.01, n
  assert n == 674_816_272
  assert n + (1152 * 16 + 16) + 256 * 1152 == 675_129_632
  assert {p.dtype for p in leaves} == {jnp.dtype("float32")}  # bf16 compute, f32 params
  assert params["y_embedder"]["embedding"].shape == (1001, 1152)
  # The recipe's keys, as the paper (and what this repository does instead of learned Σ).
  assert (c.diffusion.path, c.diffusion.prediction, c.diffusion.num_steps,
          c.diffusion.beta_schedule, c.diffusion.time_sampling) == (
              "vp_discrete", "eps", 1000, "linear", "discrete")
  assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.schedule,
          c.optim.warmup_steps, c.optim.grad_clip) == ("adamw", 1e-4, 0.0, "constant", 0, 0.0)
  assert (c.data.batch_size, c.train.ema_decay, c.diffusion.label_dropout) == (256, 0.9999, 0.1)
  assert (c.model.dtype, c.model.param_dtype, c.latent.scale) == ("bfloat16", "float32", 0.18215)
  assert not c.sample.clip_x0  # latents are not in [-1, 1]


def test_t2i_recipe_builds_text_only():
  c = t2i_recipe.get_config()
  config_lib.validate(c)
  assert (c.model.name, c.model.patch_size, c.model.class_conditional, c.text.encoder) == (
      "dit", 1, False, "clip")
  assert data.is_path(c.data.name)  # a latent cache's directory
  assert data.is_path(imagenet_recipe.get_config().data.name)


@pytest.fixture(scope="module")
def autoencoder_run(data_dir, tmp_path_factory):
  """A 1-step autoencoder run on the digits at 16×16 (f = 2, 4 latent channels)."""
  ae = str(tmp_path_factory.mktemp("ae"))
  loop.train(tiny_config(data_dir, **{
      "task": "autoencoder", "data.image_size": 16, "autoencoder.channels": (8, 16),
      "autoencoder.norm_groups": 4, "autoencoder.latent_channels": 4,
      "autoencoder.disc_weight": 0.0, "model.class_conditional": False,
      "train.num_steps": 1, "sample.per_class": 0}), ae)
  return ae


@pytest.fixture(scope="module")
def latent_cache(autoencoder_run, data_dir, tmp_path_factory):
  """The latent cache of 64 training images with flips by `autoencoder_run`, written as
  diffusion-jax-encode does (`latents.write_split` with `latent.load_autoencoder`)."""
  ae = autoencoder_run
  mesh = parallel.make_mesh(config_lib.base().mesh)
  autoencoder, params = latent.load_autoencoder(ae, mesh=mesh)
  out = str(tmp_path_factory.mktemp("latents") / "digits16_ae")
  info = latents.write_split(
      out, "sklearn_digits", "train[:64]", data_dir,
      lambda p, x, y: autoencoder.encode(p, x), params, image_size=16, flips=True,
      batch_size=64, chunk_size=64, mesh=mesh, autoencoder=ae, scale=autoencoder.scale,
      shift=autoencoder.shift)
  assert info.kind == "latents" and info.image_shape == (8, 8, 4) and info.latents.flips
  return out


def _saved_config(workdir):
  with open(os.path.join(workdir, "config.json")) as f:
    return config_lib.from_json(f.read())


def _assert_one_step(workdir):
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["1"]
  assert os.listdir(os.path.join(workdir, "samples")) == ["step_0000001.png"]
  (m,) = [m for m in read_metrics(workdir) if "loss" in m]
  assert np.isfinite(m["loss"])


def test_dit_xl2_recipe_trains_one_step_on_a_latent_cache(latent_cache, tmp_path):
  w = str(tmp_path / "dit")
  run_train_in_process([f"--config={IMAGENET}", f"--workdir={w}",
                        f"--config.data.name={latent_cache}", "--config.model.variant=",
                        *ONE_STEP])
  _assert_one_step(w)
  c = _saved_config(w)
  recipe = imagenet_recipe.get_config()
  for key in ("diffusion", "optim", "latent", "sample.sampler", "sample.guidance",
              "sample.clip_x0", "data.random_flip", "train.ema_decay", "model.dtype",
              "model.param_dtype", "model.patch_size", "model.class_conditional"):
    assert config_lib.get(c, key) == config_lib.get(recipe, key), key
  info = loop.dataset_info(c)
  task = tasks.make(c, info)
  assert task.generator.pictures and task.likelihood is None
  state = jax.eval_shape(task.init, jax.random.key(0))
  patch = state.params["x_embedder"]["kernel"]  # the denoiser sees the 8×8×4 latents
  assert patch.shape == (2, 2, 4, 32) and patch.dtype == jnp.float32
  assert state.params["y_embedder"]["embedding"].shape == (11, 32)  # 10 digits + ∅


@pytest.fixture(scope="module")
def clip_run(data_dir, tmp_path_factory):
  """A 1-step clip run of configs/digits_clip.py (its text encoder is all t2i needs)."""
  w = str(tmp_path_factory.mktemp("clip"))
  c = digits_clip.get_config()
  c.data.update(data_dir=data_dir, batch_size=16)
  c.train.update(num_steps=1, log_every=1)
  loop.train(c, w)
  return w


@pytest.mark.slow  # text conditioning in latent space: test_text_to_image + test_latent_diffusion
def test_t2i_recipe_trains_one_step_on_a_latent_cache(latent_cache, clip_run, tmp_path):
  w = str(tmp_path / "t2i")
  run_train_in_process([f"--config={T2I}", f"--workdir={w}",
                        f"--config.data.name={latent_cache}",
                        f"--config.text.clip_workdir={clip_run}", *ONE_STEP])
  _assert_one_step(w)
  c = _saved_config(w)
  assert (c.model.patch_size, c.model.class_conditional, c.text.encoder, c.text.clip_workdir,
          c.diffusion.path, c.latent.scale) == (1, False, "clip", clip_run, "flow", None)
  task = tasks.make(c, loop.dataset_info(c))
  assert task.text is not None and task.generator.pictures


DREAMBOOTH = os.path.join(ROOT, "configs", "t2i256_dreambooth_lora.py")


@pytest.mark.slow  # a base step + a DreamBooth-LoRA step of the latent DiT (~40 s)
def test_t2i256_dreambooth_lora_recipe_trains_one_step(autoencoder_run, clip_run, data_dir,
                                                       tmp_path):
  """The accelerator recipe, shrunk in the model, the batch and the image size (16² digits,
  the 1-step autoencoder encoding them in the step, text.max_length 32 for the digits'
  clip run): one step of a base with its network (task=diffusion), then one step of the
  recipe itself from it — LoRA on the attention projections, prior preservation on
  paired batches, its optimizer — writing its adapter file."""
  from diffusion_jax_configs import t2i256_dreambooth_lora as recipe
  c = recipe.get_config()
  config_lib.validate(c)
  assert (c.task, c.finetune.method, c.finetune.lora_rank, c.optim.lr, c.optim.warmup_steps,
          c.optim.weight_decay, c.data.batch_size, c.diffusion.prior_weight,
          c.train.num_steps) == ("finetune", "lora", 4, 5e-4, 500, 1e-2, 8, 1.0, 500)
  shrink = [f"--config.data.data_dir={data_dir}", "--config.data.name=sklearn_digits",
            "--config.data.paired_name=sklearn_digits", "--config.data.image_size=16",
            f"--config.latent.autoencoder={autoencoder_run}", "--config.latent.preset=",
            f"--config.text.clip_workdir={clip_run}", "--config.text.max_length=32",
            *ONE_STEP, "--config.model.variant="]
  base = str(tmp_path / "base")
  run_train_in_process([f"--config={DREAMBOOTH}", f"--workdir={base}", *shrink,
                        "--config.task=diffusion", "--config.init.map=()",
                        "--config.init.rules=()", "--config.data.paired_name=",
                        "--config.sample.per_class=0"])
  w = str(tmp_path / "lora")
  run_train_in_process([f"--config={DREAMBOOTH}", f"--workdir={w}", *shrink,
                        f"--config.init.from_workdir={base}"])
  _assert_one_step(w)
  assert os.listdir(os.path.join(w, "adapters")) == ["1.safetensors"]
