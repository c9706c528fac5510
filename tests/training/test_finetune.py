"""Fine-tuning: LoRA, textual inversion, prior preservation, starting from a run
(diffusion_jax/training/tasks/finetune.py, training/warmstart.py, nets/adapters.py).

The invariants: only what the method trains changes (frozen parameters bitwise equal
to the base run's, with no optimizer state), the base run's files are never written, a
fresh or zero-scaled LoRA model is the base model, merged == unmerged, adapter files
load onto the base run and give the fine-tuned run's samples, resume is exact.
"""
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (ROOT, assert_trees_equal, run_cli, tiny_config, tiny_t2i_config)
from diffusion_jax import runs
from diffusion_jax.data import text as text_lib
from diffusion_jax.training import generate, loop, step as step_lib, tasks
from diffusion_jax.training.tasks import finetune

FINETUNE = {"task": "finetune", "init.map": (("^", "denoiser/"),),
            "init.rules": (("^(lora|embeddings|text)(/|$)", "init"),),
            "optim.warmup_steps": 0, "optim.schedule": "constant", "optim.lr": 1e-2,
            "optim.weight_decay": 0.0}


def _tree_digest(workdir):
  """{relative path: sha256} of every file under a run directory."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      p = os.path.join(root, name)
      with open(p, "rb") as f:
        out[os.path.relpath(p, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _opt_arrays(opt_state, prefix):
  """Optimizer-state arrays whose path starts with `prefix` (e.g. 'denoiser')."""
  found = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
    # Dict keys along the path: the partition ('train' | 'frozen'), then the params tree.
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if len(keys) > 1 and keys[1] == prefix and getattr(leaf, "shape", ()) != ():
      found.append(path)
  return found


def _samples(workdir, n=8, **kw):
  images, _, _ = generate.sample_run(str(workdir), n, list(range(n)), seed=3, **kw)
  return np.asarray(images)


@pytest.fixture(scope="module")
def lora_run(tiny_teacher, data_dir, tmp_path_factory):
  """A 4-step LoRA run on the tiny class-conditional base (and the base's digest)."""
  before = _tree_digest(tiny_teacher)
  workdir = str(tmp_path_factory.mktemp("lora"))
  config = tiny_config(data_dir, **FINETUNE, **{
      "init.from_workdir": tiny_teacher, "finetune.method": "lora",
      "finetune.lora_rank": 2, "train.num_steps": 4, "train.checkpoint_every": 2})
  state = loop.train(config, workdir)
  return workdir, config, jax.device_get(state), before


def test_lora_trains_only_its_adapters_and_never_writes_the_base(lora_run, tiny_teacher):
  workdir, config, state, before = lora_run
  assert _tree_digest(tiny_teacher) == before  # the base run's files are untouched
  base_ema = jax.device_get(runs.load(tiny_teacher, params="ema").params)
  assert_trees_equal(state.params["denoiser"], base_ema)      # frozen: bitwise
  assert_trees_equal(state.ema_params["denoiser"], base_ema)  # and its EMA too
  assert not _opt_arrays(state.opt_state, "denoiser")         # no optimizer state
  assert _opt_arrays(state.opt_state, "lora")
  b = [x for p, x in jax.tree_util.tree_leaves_with_path(state.params["lora"])
       if getattr(p[-1], "key", None) == "b"]
  assert b and all(np.any(x != 0) for x in b)                 # B moved away from 0
  # The adapters alone: a small file beside each checkpoint.
  files = sorted(os.listdir(os.path.join(workdir, "adapters")))
  assert files == ["2.safetensors", "4.safetensors"]
  adapter_bytes = os.path.getsize(os.path.join(workdir, "adapters", "4.safetensors"))
  ckpt_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                   os.walk(os.path.join(workdir, "checkpoints", "4")) for f in fs)
  assert adapter_bytes * 10 < ckpt_bytes


def test_lora_resume_is_exact(lora_run, tiny_teacher, data_dir, tmp_path):
  """2 steps, then 2 more in the same workdir == the module's 4-step run, bitwise."""
  _, config, state, _ = lora_run
  two = config.copy_and_resolve_references()
  two.train.num_steps = 2
  loop.train(two, str(tmp_path))
  resumed = jax.device_get(loop.train(config, str(tmp_path)))
  assert_trees_equal(resumed.params, state.params)
  assert_trees_equal(resumed.ema_params, state.ema_params)


def test_lora_scale_zero_is_the_base_and_merged_equals_unmerged(lora_run, tiny_teacher):
  workdir, config, state, _ = lora_run
  base = _samples(tiny_teacher)
  np.testing.assert_array_equal(_samples(workdir, lora_scale=0.0), base)
  adapted = _samples(workdir)
  assert np.max(np.abs(adapted - base)) > 1e-3  # the adapters do something
  # Merged into the base weights, sampled as a plain diffusion run.
  comp = runs.load(workdir)
  merged = finetune.merged(config, comp.params)
  base_comp = runs.load(tiny_teacher)
  gen = tasks.make(base_comp.config, base_comp.info).generator
  cond = gen.conditioning(np.arange(8) % 10)
  fn = generate.compile_sampler(gen.sample())
  images = generate.generate(fn, merged, cond, jax.random.key(3), base_comp.mesh)
  np.testing.assert_allclose(np.asarray(images), adapted, atol=2e-5)


def test_adapter_files_load_onto_the_base_and_compose(lora_run, tiny_teacher):
  workdir, _, _, _ = lora_run
  path = os.path.join(workdir, "adapters", "4.safetensors")
  adapted = _samples(workdir)
  np.testing.assert_allclose(_samples(tiny_teacher, adapters=[(path, 1.0)]), adapted,
                             atol=2e-5)
  # Two halves compose to the whole (the weights fold into B, so one program serves).
  np.testing.assert_allclose(
      _samples(tiny_teacher, adapters=[(path, 0.5), (path, 0.5)]), adapted, atol=2e-5)


def test_adapters_refuse_another_architecture(lora_run, data_dir):
  workdir, _, _, _ = lora_run
  other = tiny_config(data_dir, **{"model.channels": 16})
  path = os.path.join(workdir, "adapters", "4.safetensors")
  with pytest.raises(ValueError, match="another architecture: config.model differs in "
                                       r"\['channels'\]"):
    finetune.attach(other, {}, [(path, 1.0)])  # checked before any parameter is read
  with pytest.raises(ValueError, match="cannot read adapter file .*not a diffusion_jax"):
    finetune.attach(tiny_config(data_dir), {}, [(os.path.join(
        workdir, "checkpoints", "4", "_CHECKPOINT_METADATA"), 1.0)])


def test_finetune_needs_its_base_and_names_missing_rules(tiny_teacher, data_dir, tmp_path):
  config = tiny_config(data_dir, **{**FINETUNE, "train.num_steps": 1})
  with pytest.raises(ValueError, match="needs config.init.from_workdir"):
    loop.train(config, str(tmp_path / "a"))
  config = tiny_config(data_dir, **{**FINETUNE, "init.rules": (), "train.num_steps": 1,
                                    "init.from_workdir": tiny_teacher})
  with pytest.raises(ValueError, match=r"lora/denoiser/\S+/a .*: not in the base run"):
    loop.train(config, str(tmp_path / "b"))
  config = tiny_config(data_dir, **{**FINETUNE, "train.num_steps": 1, "model.channels": 16,
                                    "init.from_workdir": tiny_teacher})
  with pytest.raises(ValueError, match="model.channels: base run has 8, this run has 16"):
    loop.train(config, str(tmp_path / "c"))
  assert not os.path.exists(tmp_path / "c" / "checkpoints" / "1")


def test_prior_preservation_is_instance_plus_lambda_prior(tiny_teacher, data_dir):
  """The paired batch's loss equals the instance half's loss + λ × the class half's,
  each computed alone with the same per-example keys (Ruiz et al. 2023, eq. 2)."""
  config = tiny_config(data_dir, **{"diffusion.prior_weight": 0.7})
  comp = runs.load(tiny_teacher)
  task = tasks.make(config, comp.info)
  player = task.players[0]
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (8, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
  paired = dict(batch, paired=jnp.asarray([0, 0, 0, 0, 1, 1, 1, 1], jnp.int32))
  keys = step_lib.example_keys(jax.random.key(1), 8)
  ctx = step_lib.StepContext(step=jnp.zeros((), jnp.int32), update=0,
                             dropout_key=jax.random.key(2), axis_name=None, state=None)
  loss = jax.jit(lambda b, k: player.loss(comp.params, b, k, ctx)[0])
  half = lambda b, s: {k: v[s] for k, v in b.items()}
  inst = loss(half(batch, slice(0, 4)), keys[:4])
  prior = loss(half(batch, slice(4, 8)), keys[4:])
  np.testing.assert_allclose(loss(paired, keys), inst + 0.7 * prior, rtol=1e-6)


@pytest.fixture(scope="module")
def t2i_base(tiny_clip, data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("t2i"))
  loop.train(tiny_t2i_config(data_dir, tiny_clip, **{"train.num_steps": 4}), workdir)
  return workdir


def test_textual_inversion_changes_only_the_placeholder_row(t2i_base, tiny_clip, data_dir,
                                                            tmp_path):
  config = tiny_t2i_config(data_dir, tiny_clip, **FINETUNE, **{
      "init.from_workdir": t2i_base, "finetune.method": "textual_inversion",
      "finetune.placeholders": 2, "finetune.initializer": "digit",
      "text.templates": ("a handwritten <v>", "the digit <v>"), "data.labels": (9,),
      "data.max_examples": 5, "train.num_steps": 3, "train.checkpoint_every": 3})
  state = jax.device_get(loop.train(config, str(tmp_path)))
  base = jax.device_get(runs.load(t2i_base).params)
  assert_trees_equal(state.params["denoiser"], base)
  assert set(state.params) == {"denoiser", "embeddings"}
  emb = state.params["embeddings"]
  # Started from the mean embedding of "digit"'s byte tokens; only <v0> was in captions.
  table = jax.device_get(runs.load(tiny_clip).params)["text"]["token_embedding"]["embedding"]
  start = table[text_lib.encode(["digit"], 7)[0][1:-1]].mean(0)
  np.testing.assert_allclose(emb[1], start, rtol=1e-6)
  assert np.max(np.abs(emb[0] - start)) > 1e-4
  assert not _opt_arrays(state.opt_state, "denoiser")
  # The learned token in a prompt, through the command line, onto the base run.
  out = tmp_path / "v.npz"
  adapter = tmp_path / "adapters" / "3.safetensors"
  run_cli("sample", [f"--workdir={t2i_base}", f"--output={out}", "--num_samples=4",
                     f"--adapter={adapter}", "--prompt=a handwritten <v>"])
  with np.load(out) as f:
    assert f["images"].shape == (4, 8, 8, 1)
  # A placeholder without a learned embedding is an error naming it.
  with pytest.raises(ValueError, match="placeholder token.*<v0>.*has 0 learned"):
    generate.sample_run(t2i_base, 2, prompts=["a handwritten <v>"])


@pytest.mark.slow  # two runs (~20 s); the text path's gradients: textual inversion (default)
def test_text_encoder_lora_and_full_text_encoder_training(t2i_base, tiny_clip, data_dir,
                                                          tmp_path):
  """LoRA with train_text_encoder adapts the clip text encoder too (its own weights stay
  the clip run's constants); method 'full' with train_text_encoder trains the text
  tower's weights (in the state) but leaves the vision tower as it was."""
  common = dict(FINETUNE, **{"init.from_workdir": t2i_base, "train.num_steps": 2,
                             "train.checkpoint_every": 2, "sample.per_class": 0,
                             "finetune.train_text_encoder": True})
  lora = jax.device_get(loop.train(tiny_t2i_config(data_dir, tiny_clip, **common, **{
      "finetune.method": "lora"}), str(tmp_path / "lora")))
  text_b = [x for p, x in jax.tree_util.tree_leaves_with_path(lora.params["lora"]["text"])
            if getattr(p[-1], "key", None) == "b"]
  assert text_b and all(np.any(x != 0) for x in text_b)
  assert "text" not in lora.params
  full = jax.device_get(loop.train(tiny_t2i_config(data_dir, tiny_clip, **common, **{
      "finetune.method": "full"}), str(tmp_path / "full")))
  clip = jax.device_get(runs.load(tiny_clip).params)
  assert_trees_equal(full.params["text"]["vision"], clip["vision"])
  assert np.any(full.params["text"]["text"]["token_embedding"]["embedding"]
                != clip["text"]["token_embedding"]["embedding"])
  base = jax.device_get(runs.load(t2i_base).params)
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(full.params["denoiser"]),
                                            jax.tree.leaves(base)))


@pytest.mark.slow  # a DiT base + its LoRA run (~40 s); the U-Net tests hold the invariants
def test_dit_lora_is_the_base_when_fresh_and_trains(data_dir, tmp_path):
  dit = {"model.name": "dit", "model.hidden_size": 32, "model.depth": 2,
         "model.num_heads": 2, "model.patch_size": 2, "sample.per_class": 0}
  base = str(tmp_path / "base")
  loop.train(tiny_config(data_dir, **dit, **{"train.num_steps": 2}), base)
  fresh = str(tmp_path / "fresh")
  config = tiny_config(data_dir, **dit, **{**FINETUNE, **{
      "init.from_workdir": base, "finetune.method": "lora", "optim.lr": 0.0,
      "train.num_steps": 1, "train.checkpoint_every": 1}})
  state = jax.device_get(loop.train(config, fresh))
  assert set(finetune.adapters_lib.by_layer(state.params["lora"]["denoiser"])) == {
      f"blocks_{i}/attn/{p}" for i in range(2) for p in ("qkv", "proj")}
  np.testing.assert_array_equal(_samples(fresh), _samples(base))  # lr 0: B stays 0


def test_dreambooth_lora_through_the_command_line(tiny_clip, data_dir,
                                                                        tmp_path):
  """The shipped configs at the tiny size, every step a command: a text-to-image base of
  configs/digits_t2i.py; class images drawn by it (diffusion-jax-sample) and written as a
  dataset (diffusion-jax-images); DreamBooth-LoRA with prior preservation on the first
  five 9s; sampling its adapter file onto the base (lora_scale 0 = the base, bitwise).
  (Textual inversion's <v> through the command line: the test above.)"""
  from conftest import TINY_FLAGS, run_train_in_process
  tiny = [f"--config.data.data_dir={data_dir}", f"--config.text.clip_workdir={tiny_clip}",
          *TINY_FLAGS]
  base = tmp_path / "base"
  run_train_in_process([f"--config={ROOT}/configs/digits_t2i.py", f"--workdir={base}", *tiny,
                        "--config.train.num_steps=2", "--config.sample.per_class=0",
                        "--config.data.labels=(0,1,2,3,4,5,6,7,8)"])
  run_cli("sample", [f"--workdir={base}", "--num_samples=6", "--prompt=a digit",
                     f"--output={tmp_path / 'class.npz'}"])
  run_cli("images", [f"--input={tmp_path / 'class.npz'}", "--caption=a digit",
                     f"--output={tmp_path / 'class'}"])
  lora = tmp_path / "lora"
  run_train_in_process([f"--config={ROOT}/configs/digits_dreambooth_lora.py",
                        f"--workdir={lora}", *tiny, f"--config.init.from_workdir={base}",
                        f"--config.data.paired_name={tmp_path / 'class'}",
                        "--config.train.num_steps=2", "--config.optim.lr=0.05"])
  assert os.listdir(lora / "adapters") == ["2.safetensors"]
  out = lambda name: str(tmp_path / f"{name}.npz")
  args = ["--num_samples=4", "--prompt=a sks digit"]
  run_cli("sample", [f"--workdir={base}", f"--output={out('base')}", *args])
  run_cli("sample", [f"--workdir={base}", f"--output={out('zero')}", *args,
                     f"--adapter={lora / 'adapters' / '2.safetensors'}", "--lora_scale=0"])
  run_cli("sample", [f"--workdir={lora}", f"--output={out('lora')}", *args])
  images = {k: np.load(out(k))["images"] for k in ("base", "zero", "lora")}
  np.testing.assert_array_equal(images["zero"], images["base"])
  assert np.any(images["lora"] != images["base"])


@pytest.mark.slow  # 8 == 1 is held by default tests for the generic step; this is LoRA + pairs
def test_paired_lora_run_on_8_devices_equals_1(tiny_teacher, data_dir, tmp_path):
  """A DreamBooth-LoRA-shaped run (paired batches, prior weighting) gives the same state
  on 8 devices as on 1: the prior-preservation loss is a plain per-example mean."""
  config = tiny_config(data_dir, **FINETUNE, **{
      "init.from_workdir": tiny_teacher, "finetune.method": "lora", "train.num_steps": 2,
      "train.checkpoint_every": 2, "sample.per_class": 0, "data.paired_name": "sklearn_digits",
      "data.labels": (9,), "data.max_examples": 5, "diffusion.prior_weight": 0.5})
  one = jax.device_get(loop.train(config, str(tmp_path / "one"), devices=jax.devices()[:1]))
  eight = jax.device_get(loop.train(config, str(tmp_path / "eight")))
  assert_trees_equal(eight.params, one.params, rtol=1e-5, atol=1e-6)


def test_a_trainable_class_table_changes_only_the_rows_it_sees(tiny_teacher, data_dir,
                                                               tmp_path):
  """configs/digits_lora.py's subset: LoRA plus the class table, trained on 9s only.
  Rows of labels never in a batch get zero gradients, so Adam (no weight decay) leaves
  them bit for bit; row 9 and the ∅ row (label dropout) move."""
  config = tiny_config(data_dir, **FINETUNE, **{
      "init.from_workdir": tiny_teacher, "finetune.method": "lora", "train.num_steps": 2,
      "train.checkpoint_every": 2, "sample.per_class": 0, "data.labels": (9,),
      "data.max_examples": 5, "optim.trainable": ("^lora/", "^denoiser/Embed_0/")})
  state = jax.device_get(loop.train(config, str(tmp_path)))
  old = jax.device_get(runs.load(tiny_teacher).params)["Embed_0"]["embedding"]
  new = state.params["denoiser"]["Embed_0"]["embedding"]
  np.testing.assert_array_equal(new[:9], old[:9])
  assert np.any(new[9] != old[9]) and np.any(new[10] != old[10])
  rest = {k: v for k, v in state.params["denoiser"].items() if k != "Embed_0"}
  base = {k: v for k, v in jax.device_get(runs.load(tiny_teacher).params).items()
          if k != "Embed_0"}
  assert_trees_equal(rest, base)


@pytest.fixture(scope="module")
def t2i_cli_base(tiny_clip, data_dir, tmp_path_factory):
  """configs/digits_t2i.py at the tiny size without the 9s, through diffusion-jax-train,
  and the class images of "a digit" written by diffusion-jax-sample + -images."""
  from conftest import TINY_FLAGS, run_train_in_process
  root = tmp_path_factory.mktemp("t2i_cli")
  tiny = [f"--config.data.data_dir={data_dir}", f"--config.text.clip_workdir={tiny_clip}",
          *TINY_FLAGS]
  run_train_in_process([f"--config={ROOT}/configs/digits_t2i.py", f"--workdir={root / 'base'}",
                        *tiny, "--config.train.num_steps=2", "--config.sample.per_class=0",
                        "--config.data.labels=(0,1,2,3,4,5,6,7,8)"])
  run_cli("sample", [f"--workdir={root / 'base'}", "--num_samples=6", "--prompt=a digit",
                     f"--output={root / 'class.npz'}"])
  run_cli("images", [f"--input={root / 'class.npz'}", "--caption=a digit",
                     f"--output={root / 'class'}"])
  return root, tiny


@pytest.mark.slow  # three configs × (4 steps, 2 + 2 steps, a sample): ~90 s
@pytest.mark.parametrize("name", ["digits_finetune", "digits_dreambooth",
                                  "digits_textual_inversion"])
def test_each_method_resumes_exactly_through_the_command_line(name, t2i_cli_base, tmp_path):
  """Plain fine-tuning, full DreamBooth (paired class images) and textual inversion as
  shipped: 4 steps == 2 steps then resumed to 4 in the same workdir, bitwise; then a
  sample through diffusion-jax-sample."""
  from conftest import load_state, run_train_in_process
  root, tiny = t2i_cli_base
  args = [f"--config={ROOT}/configs/{name}.py", *tiny, f"--config.init.from_workdir={root / 'base'}",
          "--config.train.checkpoint_every=2", "--config.sample.per_class=0"]
  if name == "digits_dreambooth":
    args.append(f"--config.data.paired_name={root / 'class'}")
  run_train_in_process([*args, f"--workdir={tmp_path / 'whole'}", "--config.train.num_steps=4"])
  run_train_in_process([*args, f"--workdir={tmp_path / 'cut'}", "--config.train.num_steps=2"])
  run_train_in_process([*args, f"--workdir={tmp_path / 'cut'}", "--config.train.num_steps=4"])
  assert_trees_equal(load_state(tmp_path / "cut"), load_state(tmp_path / "whole"))
  prompt = "a handwritten <v>" if name == "digits_textual_inversion" else "a sks digit"
  out = tmp_path / "s.npz"
  run_cli("sample", [f"--workdir={tmp_path / 'whole'}", f"--output={out}", "--num_samples=2",
                     f"--prompt={prompt}"])
  assert np.load(out)["images"].shape == (2, 8, 8, 1)
