"""The clip task: end to end through the real command line, held-out retrieval far
above chance; one pmap step equals one jit step (the contrastive loss is over the
global batch on both paths)."""
import json
import os

import jax
import numpy as np
import pytest

from conftest import ROOT, read_metrics, run_cli
from diffusion_jax import data, parallel
from diffusion_jax.training import loop, step as step_lib, tasks
from diffusion_jax.training.tasks import clip as clip_task

CONFIG = os.path.join(ROOT, "configs", "digits_clip.py")
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def test_train_cli_then_held_out_retrieval(data_dir, tmp_path):
  """configs/digits_clip.py for 150 of its 400 steps (schedule over 150): the held-out
  (test split, 296 digits) class-level retrieval is far above the 10% chance
  (measured 0.66 image→text, 0.86 text→image, zero-shot 0.66; the full 400-step
  config: docs/clip.md)."""
  run_cli("train", [f"--config={CONFIG}", f"--workdir={tmp_path}",
                    f"--config.data.data_dir={data_dir}", "--config.train.num_steps=150"])
  metrics = read_metrics(tmp_path)
  assert [m["step"] for m in metrics] == [50, 100, 150]
  assert {"loss", "i2t", "t2i", "i2t_class", "t2i_class", "logit_scale"} <= set(metrics[-1])
  assert metrics[-1]["loss"] < metrics[0]["loss"]
  assert not (tmp_path / "samples").exists()  # nothing to generate
  # The config's own model, through the command line, checkpointed at the end: this
  # holds tests/training/test_loop.py's every-config invariant for digits_clip.py.
  assert os.listdir(tmp_path / "checkpoints") == ["150"]
  results = clip_task.evaluate_run(str(tmp_path))
  assert results["step"] == 150 and results["num_examples"] == 296 and results["chance"] == 0.1
  assert results["i2t_class"] > 0.5 and results["t2i_class"] > 0.5, results
  assert results["zero_shot"] > 0.5, results
  print(results)


@pytest.mark.slow
def test_full_config_and_retrieval_cli(data_dir, tmp_path):
  run_cli("train", [f"--config={CONFIG}", f"--workdir={tmp_path}",
                    f"--config.data.data_dir={data_dir}"])
  out = run_cli("clip_retrieval", [f"--workdir={tmp_path}"]).stdout.strip().splitlines()[-1]
  results = json.loads(out)
  assert results == json.loads((tmp_path / "eval" / "retrieval_400.json").read_text())
  assert results["i2t_class"] > 0.8 and results["t2i_class"] > 0.8, results


@pytest.mark.parametrize("loss", ["siglip", pytest.param("clip", marks=pytest.mark.slow)])
def test_pmap_step_equals_jit_step(data_dir, loss):
  """Under pmap each of 8 devices sees 2 of 16 examples; the task all-gathers the
  embeddings, so loss, metrics and the update equal the jit step's on the whole batch.
  (SGD: the update is lr × gradient, so a wrong gradient shows in the parameters.)"""
  from diffusion_jax.config import base
  config = base()
  config.task, config.clip.loss = "clip", loss
  config.data.update(dict(data_dir=data_dir, batch_size=16))
  config.text.max_length = 32
  config.clip.update(dict(embed_dim=8, text_width=8, text_depth=1, text_heads=2,
                          vision_width=8, vision_depth=1, vision_heads=2, patch_size=4))
  config.optim.update(dict(name="sgd", lr=0.5, schedule="constant", warmup_steps=0))
  info = loop.dataset_info(config)
  task = tasks.make(config, info)
  assert task.text is not None and task.generator is None and task.text_encoder is not None
  init_key, step_root, _ = loop.keys(config.seed)
  state = jax.device_get(jax.jit(task.init, compiler_options=FAST_COMPILE)(init_key))
  batch = next(data.make_train_iterator(config.data, seed=0, text=task.text))
  key = jax.random.fold_in(step_root, 0)
  body = step_lib.make_train_step(task)
  want_state, want = jax.jit(body, compiler_options=FAST_COMPILE)(state, batch, key)
  step = parallel.pmap_step(body)
  got_state, got = step(parallel.replicate(state), parallel.split_for_pmap(batch), key)
  for k, v in want.items():
    np.testing.assert_allclose(np.asarray(got[k]), np.full(8, v), rtol=2e-5, atol=1e-6,
                               err_msg=k)
  assert float(want["grad_norm"]) > 0
  got_params = jax.device_get(parallel.unreplicate(got_state)).params
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6),
               got_params, jax.device_get(want_state.params))
