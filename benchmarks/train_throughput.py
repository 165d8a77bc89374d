"""Images/s of the real train and eval steps on the current default device, synthetic input.

  python benchmarks/train_throughput.py [--models=mamba_adaptor_b1,mamba_adaptor_b2]
      [--batch_size=128] [--image_size=224] [--dtype=bfloat16] [--warmup=2] [--iters=10]
      [--scan_backend=auto] [--noinput_pipeline] [--out=PATH]

The issue's H200 target (b2, batch 128, bf16, >= 1500 training images/s) is exactly
  python benchmarks/train_throughput.py --models=mamba_adaptor_b2 --batch_size=128

Everything goes through the training code (adaptor_jax.training): default_config() with the model,
batch size, dtype and scan backend set; optimizer.make; sharding.make_mesh over every device;
steps.create / make_train_step / make_eval_step. The train step is the one training runs: on-device
random erasing, mixup / cutmix and label smoothing, forward, backward, AdamW with clipping, EMA
update, with the state donated. Input: one synthetic batch (uniform uint8 images, int32 labels of
1000 classes) placed on the mesh once with sharding.global_batch and fed to every step, so
host-to-device transfer and the input pipeline are not in the step time.

Compile time (trace + lower + XLA compile of the step; trace_lower_s: the first two) and init
time (steps.create: params, optimizer state and EMA made on the mesh) are reported separately;
--warmup steps follow, then --iters steps each timed to block_until_ready; the median is
reported. Also: XLA's compiled
memory analysis of each step, and where the device has memory_stats() (GPU, TPU) its peak bytes in
use so far in the process (cumulative over the models run before). With --input_pipeline (the
default) it first measures the host input pipeline (benchmarks/input_pipeline.py's `measure` on its
synthetic JPEG folder, ImageNet train transforms) with 0 workers and one per core, for the
images/s one core delivers next to the images/s the device consumes.

Prints a table and writes benchmarks/results/train-throughput-<platform>.json.
"""
import datetime
import os
import json
import statistics
import sys
import tempfile
import time

from absl import app, flags
import jax
import numpy as np

import results_file
from adaptor_jax.training import config as config_lib, optimizer, sharding, steps

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mamba_adaptor_b1", "mamba_adaptor_b2"], "presets to measure")
flags.DEFINE_integer("batch_size", None, "global batch; default 128 on accelerators, 8 on CPU")
flags.DEFINE_integer("image_size", 224, "square input side")
flags.DEFINE_enum("dtype", "bfloat16", config_lib.DTYPES, "compute dtype (config.dtype)")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
flags.DEFINE_integer("iters", 10, "timed steps (the median is reported)")
flags.DEFINE_string("scan_backend", "auto", "config.scan_backend")
flags.DEFINE_bool("input_pipeline", True, "also measure the host input pipeline")
flags.DEFINE_float("pipeline_seconds", 10.0, "timed seconds per input-pipeline worker count")
flags.DEFINE_string("out", None, "default benchmarks/results/train-throughput-<platform>.json")

NUM_CLASSES = 1000
IMAGENET_TRAIN = 1281167  # images: steps_per_epoch for the lr schedule (its values do not matter)


def resolved_scan_backend(name):
  """What kernels.selective_scan's backend "auto" picks on this device (see kernels/api.py)."""
  if name != "auto":
    return name
  name = os.environ.get("ADAPTOR_SCAN_BACKEND", "auto")
  if name != "auto":
    return name
  return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(jax.devices()[0].platform, "xla")


def make_config(model, batch_size):
  config = config_lib.default_config()
  config.model = model
  config.batch_size = batch_size
  config.dtype = FLAGS.dtype
  config.scan_backend = FLAGS.scan_backend
  config.num_classes = NUM_CLASSES
  config.data.image_size = FLAGS.image_size
  return config_lib.validate(config)


def synthetic_batch(batch_size, mesh, seed=0):
  """Process-local uint8 images and int32 labels, made global on `mesh` (as loop.py does)."""
  rng = np.random.default_rng(seed)
  local = batch_size // jax.process_count()
  size = FLAGS.image_size
  batch = dict(image=rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
               label=rng.integers(0, NUM_CLASSES, (local,), dtype=np.int32),
               mask=np.ones((local,), bool))
  train = sharding.global_batch({k: batch[k] for k in ("image", "label")}, mesh)
  return train, sharding.global_batch(batch, mesh)


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def memory_analysis(compiled):
  """XLA's static memory analysis of one compiled step, in bytes (None where unsupported)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - backends without it
    return None
  if m is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "temp_size_in_bytes", "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def peak_bytes():
  """Peak device bytes in use so far (max over devices), or None where memory_stats is absent."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def measure_model(model, batch_size, mesh):
  config = make_config(model, batch_size)
  n_dev = mesh.devices.size
  made = steps.make_net(config, NUM_CLASSES)
  tx = optimizer.make(config, IMAGENET_TRAIN // batch_size, trainable=made[2])
  (net, state, shardings), init_s = timed(
      lambda: steps.create(config, NUM_CLASSES, mesh, tx, made))
  params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state["params"]))
  train_step = steps.make_train_step(net, tx, config, NUM_CLASSES, shardings, mesh)
  eval_step = steps.make_eval_step(net, config, shardings["params"], mesh)
  train_batch, eval_batch = synthetic_batch(batch_size, mesh)

  start = time.perf_counter()
  train_lowered = train_step.lower(state, train_batch)
  lower_s = time.perf_counter() - start
  train_compiled = train_lowered.compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  eval_compiled = eval_step.lower(dict(params=state["params"], stats=state["stats"]),
                                  eval_batch).compile()
  eval_compile_s = time.perf_counter() - start

  state, metrics, times = results_file.timed_steps(train_compiled, state, train_batch,
                                                   FLAGS.warmup, FLAGS.iters)
  loss = float(jax.device_get(metrics["loss"]))
  if not np.isfinite(loss):
    raise FloatingPointError(f"{model}: training loss is {loss} after {FLAGS.warmup + FLAGS.iters}"
                             " steps on synthetic data")

  variables = dict(params=state["params"], stats=state["stats"])  # the trained state's
  for _ in range(FLAGS.warmup):
    jax.block_until_ready(eval_compiled(variables, eval_batch))
  eval_times = []
  for _ in range(FLAGS.iters):
    eval_times.append(timed(lambda: eval_compiled(variables, eval_batch))[1])

  step_s, eval_s = statistics.median(times), statistics.median(eval_times)
  return dict(
      model=model, batch_size=batch_size, image_size=FLAGS.image_size, dtype=config.dtype,
      scan_backend=resolved_scan_backend(config.scan_backend), params=params,
      init_s=round(init_s, 2), compile_s=round(compile_s, 2), trace_lower_s=round(lower_s, 2),
      eval_compile_s=round(eval_compile_s, 2),
      step_ms=round(step_s * 1e3, 2), step_ms_min=round(min(times) * 1e3, 2),
      step_ms_max=round(max(times) * 1e3, 2),
      train_images_per_s=round(batch_size / step_s, 2),
      train_images_per_s_per_device=round(batch_size / step_s / n_dev, 2),
      eval_step_ms=round(eval_s * 1e3, 2),
      eval_images_per_s=round(batch_size / eval_s, 2),
      eval_images_per_s_per_device=round(batch_size / eval_s / n_dev, 2),
      last_loss=round(loss, 4),
      train_memory_analysis=memory_analysis(train_compiled),
      eval_memory_analysis=memory_analysis(eval_compiled),
      peak_bytes_in_use=peak_bytes())


def measure_input_pipeline():
  """benchmarks/input_pipeline.py's measure() with 0 workers and one per core. Imported here
  only: with --noinput_pipeline the script needs neither grain nor TFDS (benchmarks/gpu_check.py
  runs it where they are not installed)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import input_pipeline  # noqa: PLC0415  (benchmarks/input_pipeline.py)
  from adaptor_jax.data import pipeline  # noqa: PLC0415
  batch_size, cores = 64, os.cpu_count() or 1
  images = max(300, 2 * batch_size * cores)  # the pipeline starts at most one worker per batch
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    cfg = pipeline.default_data_config()
    cfg.name, cfg.data_dir = input_pipeline.build_synthetic(tmp, images), tmp
    for workers in sorted({0, cores}):
      rows.append(input_pipeline.measure(cfg, batch_size=batch_size, num_workers=workers,
                                         seconds=FLAGS.pipeline_seconds))
      print(f"input pipeline, {workers} workers: {rows[-1]['images_per_s']} images/s, "
            f"{rows[-1]['images_per_s_per_core']} images/s per core", flush=True)
  return dict(dataset=f"synthetic: {images} random JPEGs 500x375", batch_size=batch_size,
              transforms=dict(image_size=cfg.image_size, randaugment=cfg.randaugment,
                              interpolation=cfg.interpolation),
              cpu=input_pipeline.cpu_model(), cpu_count=cores, rows=rows)


def main(argv):
  del argv
  load_before = os.getloadavg()
  started = time.time()
  # The host pipeline first: its worker processes start before the accelerator is initialised.
  pipeline_result = measure_input_pipeline() if FLAGS.input_pipeline else None

  devices = jax.devices()
  platform, kind = devices[0].platform, devices[0].device_kind
  batch_size = FLAGS.batch_size or (8 if platform == "cpu" else 128)
  if batch_size % (2 * len(devices)):  # split over every device; mixup pairs i, B-1-i
    raise ValueError(f"--batch_size={batch_size} must be a multiple of 2 x {len(devices)} devices")
  mesh = sharding.make_mesh(config_lib.default_config().mesh)
  print(f"{kind} ({platform}) x {len(devices)}, jax {jax.__version__}, batch {batch_size}, "
        f"{FLAGS.image_size}x{FLAGS.image_size}, {FLAGS.dtype}, "
        f"scan backend {resolved_scan_backend(FLAGS.scan_backend)}, warmup {FLAGS.warmup}, "
        f"median of {FLAGS.iters}", flush=True)
  header = (f"{'model':18s} {'params':>7s} {'compile s':>9s} {'step ms':>9s} {'train img/s':>11s} "
            f"{'per dev':>8s} {'eval img/s':>10s} {'peak GiB':>8s}")
  rows = []
  for model in FLAGS.models:
    row = measure_model(model, batch_size, mesh)
    rows.append(row)
    if len(rows) == 1:
      print(header)
    peak = row["peak_bytes_in_use"]
    print(f"{model:18s} {row['params'] / 1e6:6.1f}M {row['compile_s']:9.1f} {row['step_ms']:9.1f} "
          f"{row['train_images_per_s']:11.1f} {row['train_images_per_s_per_device']:8.1f} "
          f"{row['eval_images_per_s']:10.1f} {'-' if peak is None else f'{peak / 2**30:8.2f}':>8s}",
          flush=True)

  out = FLAGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"train-throughput-{platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  result = dict(
      platform=platform, device_kind=kind, device_count=len(devices),
      process_count=jax.process_count(), mesh=dict(mesh.shape), jax=jax.__version__,
      timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      host_cpu=pipeline_result["cpu"] if pipeline_result else None,
      host_cpu_count=os.cpu_count(),
      load_average_before=[round(x, 2) for x in load_before],
      input="synthetic: one uint8 batch and int32 labels (1000 classes) on device, reused",
      batch_size=batch_size, image_size=FLAGS.image_size, dtype=FLAGS.dtype,
      warmup=FLAGS.warmup, iters=FLAGS.iters,
      models={row["model"]: row for row in rows}, input_pipeline=pipeline_result,
      wall_s=round(time.time() - started, 1))
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  app.run(main)
