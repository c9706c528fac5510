r"""Training throughput of a config: compile time, step time, images/s.

  python launch/benchmark_train.py --config=configs/quickstart.py [--steps=50] \
      [--config.data.batch_size=256 ...]

Measures the real compiled train step on real batches (the same sharded jit as the
loop, no checkpoints or logging) and prints one JSON line.
"""
import json
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import config as config_lib, data, parallel
from diffusion_jax.training import loop, tasks
from diffusion_jax_launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps (after one warm-up step).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  common.start()
  config = _CONFIG.value
  config_lib.validate(config)
  task = tasks.get(config.task)
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_batch_size(config.data.batch_size, mesh)
  info = loop.dataset_info(config)
  init_key, step_root, _ = loop.keys(config.seed)
  abstract = jax.eval_shape(lambda k: task.init(config, k, info), init_key)
  shardings = parallel.state_shardings(mesh, abstract, config.mesh)
  state = jax.jit(lambda k: task.init(config, k, info), out_shardings=shardings)(init_key)
  it = data.make_train_iterator(config.data, seed=config.seed)
  batches = [parallel.host_to_global(next(it), mesh) for _ in range(min(_STEPS.value, 8))]
  step = jax.jit(task.train_step(config, info), donate_argnums=(0,),
                 in_shardings=(shardings, parallel.batch_sharding(mesh), parallel.replicated(mesh)),
                 out_shardings=(shardings, parallel.replicated(mesh)))
  t0 = time.time()
  compiled = step.lower(state, batches[0], step_root).compile()
  compile_s = time.time() - t0
  state, m = compiled(state, batches[0], jax.random.fold_in(step_root, 0))
  jax.block_until_ready(m)
  t0 = time.time()
  for i in range(_STEPS.value):
    state, m = compiled(state, batches[i % len(batches)], jax.random.fold_in(step_root, i + 1))
  jax.block_until_ready((state, m))
  step_s = (time.time() - t0) / _STEPS.value
  print(json.dumps({
      "device": str(jax.devices()[0].device_kind), "num_devices": jax.device_count(),
      "batch_size": config.data.batch_size, "compile_s": round(compile_s, 2),
      "step_ms": round(1000 * step_s, 2), "steps_per_s": round(1 / step_s, 2),
      "images_per_s": round(config.data.batch_size / step_s, 1)}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
