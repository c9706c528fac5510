r"""Training throughput of a config: compile time, step time, images/s, FLOPs, MFU, memory.

  python launch/benchmark_train.py --config=configs/quickstart.py [--steps=50] \
      [--peak_tflops=...] [--synthetic=32,32,4] [--config.data.batch_size=256 ...]

Measures the real compiled train step on real batches (the same sharded jit as the
loop, no checkpoints or logging) and prints one JSON line. --synthetic=H,W,C replaces
the dataset by uniform random images of that shape with labels of
--synthetic_classes classes (e.g. a DiT on ImageNet-256's 32×32×4 latents without the
data):

- compile_s: `lower().compile()` of the step; step_ms, steps_per_s, images_per_s: mean
  over --steps steps after one warm-up step, ended by block_until_ready.
- flops_per_step: XLA's cost analysis of the compiled step (`compiled.cost_analysis()`,
  a dict in JAX 0.10.2) times the device count. Under SPMD the analysis is of one
  device's program (checked: a [1024, 512] @ [512, 256] matmul batch-sharded over 8
  virtual CPU devices reports 1/8 of its FLOPs), so replicated work such as the
  optimizer update counts once per device. These are the FLOPs the compiled program
  executes: with rematerialisation they are hardware FLOPs, not model FLOPs, and the
  body of a `lax.scan`/`while` loop is counted once, not once per trip.
- tflops_per_s: flops_per_step / step time, all devices together.
- mfu: achieved FLOP/s per device ÷ the device's dense peak (`PEAK_TFLOPS`, chosen by
  config.model.dtype: bfloat16 → the bf16 peak; float32 → TF32 on NVIDIA, since XLA
  computes float32 dots there in TF32 by default, and the bf16 peak on TPU, whose
  default float32 dot is one bf16 pass). --peak_tflops overrides; null on CPU and on
  unknown devices.
- peak_memory_gib: `memory_stats()["peak_bytes_in_use"]` of device 0 (the whole
  process so far: state, batches, step); null where the backend reports none (CPU).
- xla_memory_gib: `compiled.memory_analysis()` of the step per device: argument +
  output + temporary − aliased (donated) bytes.
"""
import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import config as config_lib, data, parallel
from diffusion_jax.training import loop, step as step_lib, tasks
from diffusion_jax_launch import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps (after one warm-up step).")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Dense peak TFLOP/s of one device, for "
                           "mfu (default: PEAK_TFLOPS by device kind and model dtype).")
_SYNTHETIC = flags.DEFINE_list("synthetic", None, "H,W,C: random images of this shape "
                                "instead of config.data (no dataset needed).")
_SYNTHETIC_CLASSES = flags.DEFINE_integer("synthetic_classes", 1000,
                                          "Label classes of --synthetic batches.")
flags.mark_flags_as_required(["config"])
common.integer(_STEPS, 1)
common.number(_PEAK, 0, open_low=True)
common.int_list(_SYNTHETIC, 1, length=3)
common.integer(_SYNTHETIC_CLASSES, 0)

# Dense peak TFLOP/s per device (vendor data sheets): (bf16, float32 dots). NVIDIA
# float32 is TF32 on tensor cores (full float32 on an H100 SXM would be 66.9); TPU
# float32 dots run as bf16 by default. H100 and H200 are the SXM parts ("NVIDIA H100
# 80GB HBM3", "NVIDIA H200"); their PCIe and NVL parts have lower peaks and get None.
# TPU keys are JAX's device_kind ("TPU v5 lite" is v5e, "TPU v5" is v5p).
PEAK_TFLOPS = {
    "NVIDIA H100": (989.4, 494.7), "NVIDIA H200": (989.4, 494.7),
    "NVIDIA A100": (312.0, 156.0),
    "TPU v4": (275.0, 275.0), "TPU v5 lite": (197.0, 197.0), "TPU v5e": (197.0, 197.0),
    "TPU v5": (459.0, 459.0), "TPU v5p": (459.0, 459.0),
    "TPU v6 lite": (918.0, 918.0), "TPU v6e": (918.0, 918.0),
}


def peak_tflops(device_kind: str, dtype: str):
  """The table's dense peak for a device kind and compute dtype, or None."""
  lower_part = any(s in device_kind for s in ("PCIe", "NVL")) and "A100" not in device_kind
  if dtype not in ("bfloat16", "float32") or lower_part:  # A100 PCIe: the SXM peaks
    return None
  for kind, peaks in PEAK_TFLOPS.items():
    if device_kind == kind or (kind.startswith("NVIDIA") and device_kind.startswith(kind)):
      return peaks[dtype == "float32"]
  return None


def _host_batches(config, info, task):
  """Up to 8 of this host's batches: from config.data, or random with --synthetic."""
  n = min(_STEPS.value, 8)
  if not _SYNTHETIC.value:
    it = data.make_train_iterator(config.data, seed=config.seed, text=task.text)
    return [next(it) for _ in range(n)]
  local = config.data.batch_size // jax.process_count()
  rng = np.random.default_rng(config.seed + jax.process_index())
  return [{"image": rng.uniform(-1, 1, (local,) + info.image_shape).astype(np.float32),
           "label": rng.integers(0, max(info.num_classes, 1), local).astype(np.int32)}
          for _ in range(n)]


def main(argv):
  del argv
  common.start()
  try:
    _benchmark()
  except common.USER_ERRORS as e:
    common.fail(e)


def _benchmark():
  config = _CONFIG.value
  config_lib.validate(config)
  mesh = parallel.make_mesh(config.mesh)
  parallel.check_batch_size(config.data.batch_size, mesh)
  if _SYNTHETIC.value:
    shape = tuple(int(v) for v in _SYNTHETIC.value)  # H,W,C (checked by its validator)
    info = data.DatasetInfo(image_shape=shape, num_classes=_SYNTHETIC_CLASSES.value,
                            num_examples=0)
  else:
    info = loop.dataset_info(config)
  task = tasks.make(config, info)
  if _SYNTHETIC.value and task.text is not None:
    raise ValueError("--synthetic makes images and labels only; this config's task "
                     "trains on captions")
  init_key, step_root, _ = loop.keys(config.seed)
  abstract = jax.eval_shape(task.init, init_key)
  shardings = parallel.state_shardings(mesh, abstract, config.mesh)
  state = jax.jit(task.init, out_shardings=shardings)(init_key)
  batches = [parallel.host_to_global(b, mesh) for b in _host_batches(config, info, task)]
  step = jax.jit(step_lib.make_train_step(task), donate_argnums=(0,),
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

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older JAX: one per program
  flops_device = float(cost["flops"]) if cost and "flops" in cost else None
  n = jax.device_count()
  kind = str(jax.devices()[0].device_kind)
  peak = _PEAK.value or peak_tflops(kind, config.model.dtype)
  mem = compiled.memory_analysis()
  xla_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes +
               mem.temp_size_in_bytes - mem.alias_size_in_bytes) if mem else None
  stats = jax.devices()[0].memory_stats() or {}
  gib = lambda b: None if b is None else round(b / 2**30, 3)
  print(json.dumps({
      "device": kind, "num_devices": n,
      "batch_size": config.data.batch_size, "compile_s": round(compile_s, 2),
      "step_ms": round(1000 * step_s, 2), "steps_per_s": round(1 / step_s, 2),
      "images_per_s": round(config.data.batch_size / step_s, 1),
      "flops_per_step": None if flops_device is None else flops_device * n,
      "tflops_per_s": None if flops_device is None else round(flops_device * n / step_s / 1e12, 4),
      "peak_tflops": peak,
      "mfu": (round(flops_device / step_s / (peak * 1e12), 4)
              if flops_device is not None and peak else None),
      "peak_memory_gib": gib(stats.get("peak_bytes_in_use")),
      "xla_memory_gib": gib(xla_bytes)}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
