"""The shipped configs as a package: every one builds and validates, `--config=<name>`
resolves to the installed `diffusion_jax_configs` file from any directory, and the
configs are inside a built wheel. (Training one step of every config is
tests/training/test_loop.py's.)"""
import glob
import importlib
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from conftest import _FAST_COMPILE, ROOT, TINY_FLAGS

import diffusion_jax_configs
from diffusion_jax import config as config_lib
from diffusion_jax_launch import common

NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if os.path.basename(p)[:-3] not in diffusion_jax_configs.HELPERS)
BIN = os.path.dirname(sys.executable)


def test_the_installed_package_is_this_checkouts_configs():
  assert NAMES and diffusion_jax_configs.names() == NAMES
  assert os.path.samefile(os.path.dirname(diffusion_jax_configs.__file__), os.path.join(ROOT, "configs"))


@pytest.mark.parametrize("name", NAMES)
def test_every_config_builds_and_validates(name):
  c = importlib.import_module(f"diffusion_jax_configs.{name}").get_config()
  assert c.is_locked  # built on base(): an unknown key is an error
  config_lib.validate(c)


def test_a_shipped_name_resolves_to_the_package_file_outside_the_checkout(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = os.path.join(ROOT, "configs", "quickstart.py")
  for value in ("quickstart", "quickstart.py"):
    assert os.path.samefile(common.resolve_config(value), shipped)
  assert common.resolve_config("quickstart:arg") == common.resolve_config("quickstart") + ":arg"
  # An existing file is loaded as given, also one named like a shipped config.
  (tmp_path / "quickstart.py").write_text("")
  assert common.resolve_config("quickstart.py") == "quickstart.py"
  assert common.resolve_config(shipped) == shipped
  # Both spellings of the flag; nothing after `--`; other flags untouched.
  resolved = common.resolve_config("digits_ddpm")
  argv = ["prog", "--config", "digits_ddpm", "-config=digits_ddpm:x", "--config.optim.lr=1",
          "--workdir=w", "--", "--config=unknown"]
  assert common._resolve_config_args(argv) == [
      "prog", "--config", resolved, f"-config={resolved}:x", "--config.optim.lr=1",
      "--workdir=w", "--", "--config=unknown"]


def test_an_unknown_config_name_fails_naming_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as e:
    common.resolve_config("quikstart")
  message = str(e.value)
  assert "--config=quikstart" in message and "\n" not in message
  assert all(n in message for n in NAMES)
  with pytest.raises(ValueError, match="the shipped one is --config=quickstart$"):
    common.resolve_config("configs/quickstart.py")  # the checkout's path, used elsewhere
  # Through an entry point: one line on stderr, status 1, before anything is built.
  proc = subprocess.run([os.path.join(BIN, "diffusion-jax-train"), "--config=quikstart",
                         f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True,
                        timeout=120, cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == [f"error: {message}"], proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def _wheel(tmp_path):
  """Builds the wheel from a copy of what pyproject.toml packages (the checkout gets no
  build/ or egg-info from it). Returns its path."""
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    setuptools = tomllib.load(f)["tool"]["setuptools"]
  dirs = {setuptools["package-dir"].get(p, p.split(".")[0]) for p in setuptools["packages"]}
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src)
  for d in dirs:
    shutil.copytree(os.path.join(ROOT, d), src / d, ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300,
                 capture_output=True)
  (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))
  return wheel


def test_the_wheel_ships_the_configs_and_they_resolve_there(tmp_path):
  wheel = _wheel(tmp_path)
  with zipfile.ZipFile(wheel) as z:
    files = set(z.namelist())
    site = tmp_path / "site"
    z.extractall(site)  # a pure wheel unpacked is its installed layout
  assert {"diffusion_jax_configs/quickstart.py", "diffusion_jax_configs/common.py",
          "diffusion_jax_configs/__init__.py"} <= files
  assert {f"diffusion_jax_configs/{n}.py" for n in NAMES} <= files
  # The unpacked wheel alone (first on the path, cwd outside the checkout): the name
  # resolves to its own file, whose blocks import from the installed package.
  code = ("import diffusion_jax_launch\n"
          "from diffusion_jax_launch import common\n"
          "from diffusion_jax import config\n"
          "from ml_collections import config_flags\n"
          "flag = config_flags.DEFINE_config_file('config', None, '')\n"
          "common.parse_flags(['prog', '--config=quickstart'])\n"
          "config.validate(flag.value)\n"
          "print(common.resolve_config('quickstart'), diffusion_jax_launch.__file__,\n"
          "      flag.value.sample.num_steps)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  path, launch, steps = proc.stdout.split()
  assert path == str(site / "diffusion_jax_configs" / "quickstart.py")
  assert launch == str(site / "diffusion_jax_launch" / "__init__.py") and steps == "32"


@pytest.mark.slow  # the wheel test above holds resolution from the installed layout
def test_train_a_shipped_config_by_name_outside_the_checkout(tmp_path, data_dir):
  """`diffusion-jax-train --config=quickstart` from a directory that has no configs/."""
  w = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {_FAST_COMPILE}")
  proc = subprocess.run(
      [os.path.join(BIN, "diffusion-jax-train"), "--config=quickstart", f"--workdir={w}",
       f"--config.data.data_dir={data_dir}", *TINY_FLAGS, "--config.train.num_steps=1",
       "--config.train.checkpoint_every=1"],
      capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert os.listdir(w / "checkpoints") == ["1"]
  assert os.listdir(w / "samples") == ["step_0000001.png"]


def test_saved_configs_with_renamed_keys_still_read():
  """A run saved before the sampler options moved to config.sample.<sampler> reads
  under the new names (config.RENAMED)."""
  import json
  from diffusion_jax import config as config_lib
  saved = json.loads(config_lib.to_json(config_lib.base()))
  for section in ("ddim", "ddpm", "pc", "edm"):
    del saved["sample"][section]
  saved["sample"].update(ddim_eta=0.5, ddpm_variance="large", pc_snr=0.2,
                         pc_corrector_steps=3, edm_churn=10.0)
  c = config_lib.from_json(json.dumps(saved))
  assert (c.sample.ddim.eta, c.sample.ddpm.variance, c.sample.pc.snr,
          c.sample.pc.corrector_steps, c.sample.edm.s_churn) == (0.5, "large", 0.2, 3, 10.0)


# configs/imagenet64_guidance_distillation.py needs a teacher run: one step of it at a
# tiny size, its teacher trained by the same config as a plain diffusion run (the
# recipe's own teacher command), on the embedded digits. (At full size, teacher and
# student hold 296M-parameter U-Nets twice over and do not fit a 23 GiB CPU machine.)
_IN64 = os.path.join(ROOT, "configs", "imagenet64_guidance_distillation.py")
_IN64_TINY = ["--config.data.name=sklearn_digits", "--config.data.image_size=0",
              "--config.data.batch_size=8", "--config.data.num_threads=0",
              "--config.model.channels=8", "--config.model.num_res_blocks=1",
              "--config.model.num_head_channels=8", "--config.train.num_steps=1",
              "--config.train.checkpoint_every=1", "--config.train.log_every=1",
              "--config.sample.num_steps=2"]


def test_imagenet64_guidance_distillation_recipe_is_adms_unet_with_a_w_input():
  """The recipe at full size abstractly: ADM's ImageNet-64 U-Net (≈ 296M parameters)
  plus the w embedding, on the cosine VP path with v-prediction, w ∈ [0, 4]."""
  import jax
  import jax.numpy as jnp
  from diffusion_jax import nets
  c = importlib.import_module("diffusion_jax_configs.imagenet64_guidance_distillation").get_config()
  config_lib.validate(c)
  assert (c.task, c.model.guidance_input, c.guidance_distillation.w_min,
          c.guidance_distillation.w_max, c.diffusion.path, c.diffusion.prediction) == (
              "guidance_distillation", True, 0.0, 4.0, "vp_cosine", "v")
  net = nets.build_denoiser(c.model, out_channels=3, num_classes=1000)
  x = jnp.zeros((1, 64, 64, 3))
  params = jax.eval_shape(lambda: net.init(jax.random.key(0), x, jnp.zeros(1),
                                           jnp.zeros(1, jnp.int32), guidance=jnp.zeros(1)))
  n = sum(s.size for s in jax.tree.leaves(params))
  w_emb = sum(s.size for s in jax.tree.leaves(params["params"]["guidance_embedder"]))
  assert 290e6 < n - w_emb < 300e6 and w_emb == 192 * 768 + 768 * 768 + 2 * 768


@pytest.mark.slow  # two runs of the 4-level bf16 U-Net: ~70 s of CPU cold, ~30 s warm
def test_imagenet64_guidance_distillation_recipe_trains_one_step(data_dir, tmp_path):
  """One step of the recipe's teacher (--config.task=diffusion
  --config.model.guidance_input=False, as its docstring trains it) and of the student
  through diffusion-jax-train, shrunk only in width, depth and batch: the recipe's
  4-level BigGAN-resampling U-Net, cosine VP path, v-prediction, bf16 and w range stay."""
  from conftest import run_train_in_process
  teacher, student = tmp_path / "teacher", tmp_path / "student"
  tiny = [f"--config.data.data_dir={data_dir}", *_IN64_TINY]
  run_train_in_process([f"--config={_IN64}", f"--workdir={teacher}", *tiny,
                        "--config.task=diffusion", "--config.model.guidance_input=False",
                        "--config.sample.per_class=0"])
  run_train_in_process([f"--config={_IN64}", f"--workdir={student}", *tiny,
                        f"--config.distill.teacher={teacher}", "--config.sample.per_class=1"])
  assert os.listdir(student / "checkpoints") == ["1"]
  assert os.listdir(student / "samples") == ["step_0000001.png"]
