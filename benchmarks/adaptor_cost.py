"""What the adaptor costs: each adapted model's train step against its base model's, in one run.

  python benchmarks/adaptor_cost.py [--pairs=vmamba_tiny:adaptor_vmamba_tiny,...]
      [--platforms=cpu,tpu] [--cpu_batch=2] [--cpu_dtype=float32] [--iters=7]
      [--gpu_batch=128] [--gpu_dtype=bfloat16]
      [--tpu_chip=v5e] [--tpu_batch=32] [--tpu_dtype=bfloat16] [--out=PATH]

A pair is BASE:ADAPTED; a name with "+none" is that preset with config.form = "none" (b2's
dims and depths without its adaptors: "mamba_adaptor_b2+none"), and one with "/read" or
"/read+phi" has those parts of Adaptor-T replaced by nothing (adaptor_parts.py: the bound on
what a faster read or phi backward could save, "vmamba_tiny:adaptor_vmamba_tiny/read"). The
step is the real one (steps.make_train_step through the training code: the configs/ recipe's
AdamW, clipping, EMA, on-device augmentation), 224x224, 1000 classes, synthetic uint8 images.
  cpu  on this host's first CPU device: the compiled memory analysis (temporaries per image) and
       the median step time of --iters steps after one warm-up, the pair's two steps in turns;
  gpu  on this host's first GPU (benchmarks/gpu_check.py runs it, one pair per process): the
       median step time of --iters steps after one warm-up, images/s, the compiled step's memory
       (arguments + temporaries + outputs - aliases) and the device's peak bytes in use; the
       pair's models one after the other, each one's buffers freed before the next is built, so
       that a peak above the one before is the model's own (else it is left out);
  tpu  deviceless (libtpu's compiler on this host, adaptor_jax.training.aot) for one --tpu_chip:
       temporaries, HBM, FLOPs and bytes accessed per image.
Every row also gives the adapted / base ratios. Writes benchmarks/results/adaptor-cost.json
(rows merged by key, so a stopped run continues where it stopped) and prints a table.
"""
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

import results_file
from adaptor_parts import PARTS, replaced
from adaptor_jax.training import aot, config as config_lib, optimizer, sharding, steps

FLAGS = flags.FLAGS
flags.DEFINE_list("pairs", ["vmamba_tiny:adaptor_vmamba_tiny",
                            "mamba_adaptor_b2+none:mamba_adaptor_b2"], "BASE:ADAPTED presets")
flags.register_validator(
    "pairs", lambda pairs: all(len(p.split(":")) == 2 and set(parts(n)) <= set(PARTS)
                               for p in pairs for n in p.split(":")),
    "each pair is BASE:ADAPTED, a name's parts after '/' among " + "+".join(PARTS))
flags.DEFINE_list("platforms", ["cpu", "tpu"],
                  "cpu (compiled and timed here), gpu (the first GPU, timed), tpu (deviceless)")
flags.DEFINE_integer("cpu_batch", 2, "batch of the CPU step")
flags.DEFINE_enum("cpu_dtype", "float32", config_lib.DTYPES, "compute dtype of the CPU step")
flags.DEFINE_integer("gpu_batch", 128, "batch of the GPU step")
flags.DEFINE_enum("gpu_dtype", "bfloat16", config_lib.DTYPES, "compute dtype of the GPU step")
flags.DEFINE_integer("iters", 7, "timed CPU or GPU steps of each model (the median is reported)")
flags.DEFINE_enum("tpu_chip", "v5e", sorted(aot.CHIPS), "TPU chip of the deviceless compile")
flags.DEFINE_integer("tpu_batch", 32, "per-chip batch of the TPU compile")
flags.DEFINE_enum("tpu_dtype", "bfloat16", config_lib.DTYPES, "compute dtype of the TPU step")
flags.DEFINE_string("out", os.path.join(results_file.RESULTS, "adaptor-cost.json"),
                    "results file (rows merged in)")
flags.DEFINE_bool("redo", False, "measure rows the results file already has")

NUM_CLASSES = 1000


def make_config(name, dtype):
  model, _, form = name.partition("/")[0].partition("+")
  c = config_lib.default_config()
  c.model, c.dtype, c.num_classes = model, dtype, NUM_CLASSES
  if form:
    c.form = form
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1))
  return c


def parts(name):
  """The parts of Adaptor-T that `name` replaces by nothing (after a "/")."""
  return [p for p in name.partition("/")[2].split("+") if p]


def compile_step(name, platform, batch_size, dtype):
  """The train step of `name` on the first `platform` ("cpu" or "gpu") device, compiled, with
  its state and a batch, and its row so far."""
  config = make_config(name, dtype)
  config.batch_size = batch_size
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices(platform)[:1])
  made = steps.make_net(config, NUM_CLASSES)
  tx = optimizer.make(config, 1000, trainable=made[2])
  net, state, shardings = steps.create(config, NUM_CLASSES, mesh, tx, made)
  step = steps.make_train_step(net, tx, config, NUM_CLASSES, shardings, mesh)
  size, sh = config.data.image_size, sharding.batch_sharding(mesh)
  key = jax.random.PRNGKey(0)
  batch = dict(
      image=jax.device_put(jax.random.randint(key, (config.batch_size, size, size, 3), 0, 256,
                                              jnp.int32).astype(jnp.uint8), sh),
      label=jax.device_put(jnp.arange(config.batch_size, dtype=jnp.int32) % NUM_CLASSES, sh))
  start = time.perf_counter()
  with replaced(parts(name)):
    compiled = step.lower(state, batch).compile()
  row = dict(batch=config.batch_size, dtype=config.dtype,
             compile_s=round(time.perf_counter() - start, 1),
             temporaries_mb_per_image=aot.memory(compiled)["temporaries"] / config.batch_size / 1e6)
  return row, [compiled, state, batch]


def measure_cpu(names):
  """The rows of `names` (a base model and its adapted one), their steps timed in turns (one
  warm-up each, then `iters` rounds of one step of each): this machine's speed drifts by 10-20%
  over minutes, and turns keep that drift out of the ratio."""
  made = {name: compile_step(name, "cpu", FLAGS.cpu_batch, FLAGS.cpu_dtype) for name in names}
  times, loss = {name: [] for name in names}, {}
  for i in range(1 + FLAGS.iters):  # round 0 warms up
    for name, (_, run) in made.items():
      run[1], metrics, took = results_file.timed_steps(*run, 0, 1)  # run[1]: the state
      times[name] += took if i else []
      loss[name] = float(metrics["loss"])
  return {name: dict(row, step_s=results_file.median(times[name]), loss=loss[name])
          for name, (row, _) in made.items()}


def measure_gpu(names, platform="gpu"):
  """The rows of `names` (a base model and its adapted one), one model after the other on the
  first `platform` device ("cpu" runs the same path on the host: the tests) at --gpu_batch and
  --gpu_dtype: one warm-up step, the median of `iters` timed steps, images/s, the compiled
  step's memory and the peak bytes in use that the device reports while the model is built and
  run, where that is a new peak of the process (each model's buffers are freed before the next
  is built: the peak is its own)."""
  rows = {}
  for name in names:
    device = jax.devices(platform)[0]
    before = peak_bytes(device)
    row, run = compile_step(name, platform, FLAGS.gpu_batch, FLAGS.gpu_dtype)
    run[1], metrics, times = results_file.timed_steps(*run, 1, FLAGS.iters)  # run[1]: the state
    peak, step_s = peak_bytes(device), results_file.median(times)
    rows[name] = dict(row, device=device.device_kind, step_s=step_s,
                      images_per_s=row["batch"] / step_s, loss=float(metrics["loss"]),
                      compiled_gib=aot.memory(run[0])["hbm"] / 2**30,
                      peak_gib=peak / 2**30 if peak is not None and peak > before else None)
    del run, metrics  # this model's state and batch: gone before the next model is built
  return rows


def peak_bytes(device):
  """The device's peak bytes in use so far in this process (None where it reports none)."""
  return (device.memory_stats() or {}).get("peak_bytes_in_use")


def measure_tpu(name):
  config = make_config(name, FLAGS.tpu_dtype)
  devices = aot.topology_devices(FLAGS.tpu_chip, aot.CHIPS[FLAGS.tpu_chip].slice_shape(1))
  start = time.perf_counter()
  with replaced(parts(name)):
    compiled, _ = aot.compile_train_step(config, devices, FLAGS.tpu_batch)
  mem, cost = aot.memory(compiled), aot.cost(compiled)
  b = FLAGS.tpu_batch
  return dict(chip=FLAGS.tpu_chip, batch=b, dtype=config.dtype,
              compile_s=round(time.perf_counter() - start, 1),
              temporaries_mb_per_image=mem["temporaries"] / b / 1e6, hbm_gib=mem["hbm"] / 2**30,
              gflops_per_image=cost["flops"] / b / 1e9, gbytes_per_image=cost["bytes"] / b / 1e9)


MEASURE = {"cpu": measure_cpu, "gpu": measure_gpu,
           "tpu": lambda names: {name: measure_tpu(name) for name in names}}
RATIOS = {"cpu": ("temporaries_mb_per_image", "step_s"),
          "gpu": ("step_s", "images_per_s", "peak_gib", "compiled_gib",
                  "temporaries_mb_per_image"),
          "tpu": ("temporaries_mb_per_image", "gflops_per_image", "gbytes_per_image")}


def row_key(platform, name):
  if platform == "cpu":
    return f"cpu/{name}/b{FLAGS.cpu_batch}/{FLAGS.cpu_dtype}"
  if platform == "gpu":
    kind = jax.devices("gpu")[0].device_kind.replace(" ", "_").lower()
    return f"gpu/{kind}/{name}/b{FLAGS.gpu_batch}/{FLAGS.gpu_dtype}"
  return f"tpu/{FLAGS.tpu_chip}/{name}/b{FLAGS.tpu_batch}/{FLAGS.tpu_dtype}"


def ratios(platform, base, adapted):
  """adapted / base of the platform's RATIOS keys that both rows have (a GPU peak may not)."""
  return {k: adapted[k] / base[k] for k in RATIOS[platform]
          if base.get(k) and adapted.get(k) is not None}


def print_row(platform, name, row, vs):
  keys = RATIOS[platform]
  show = lambda x, spec, unit="": f"{'-':>{spec[0]}s}" if x is None else f"{x:{spec}}{unit}"
  values = " ".join(f"{k} {show(row.get(k), '9.3f')}" for k in keys)
  vs = " ".join(show(vs.get(k), "5.2f", "x") for k in keys) if vs else ""
  print(f"{platform} {name:24s} {values}  {vs}", flush=True)


def main(argv):
  del argv
  results = results_file.load(FLAGS.out)
  rows = results["rows"]
  for platform in FLAGS.platforms:
    for pair in FLAGS.pairs:
      base, adapted = names = pair.split(":")
      keys = [row_key(platform, name) for name in names]
      todo = [n for n, key in zip(names, keys) if FLAGS.redo or key not in rows]
      # the CPU times the pair's two steps in turns; the GPU runs the models still to measure
      # one after the other; a TPU row is saved as soon as it compiles, so that a stopped run
      # continues where it stopped
      groups = {"cpu": [names], "gpu": [todo], "tpu": [[n] for n in todo]}[platform]
      for group in groups if todo else []:
        for name, row in MEASURE[platform](group).items():
          rows[row_key(platform, name)] = dict(row, model=name, platform=platform)
        if all(key in rows for key in keys):
          rows[keys[1]]["vs"] = base
          rows[keys[1]]["ratios"] = ratios(platform, rows[keys[0]], rows[keys[1]])
        results_file.save(FLAGS.out, results, jax=jax.__version__,
                          host_cpu_count=os.cpu_count())
      for key, name in zip(keys, names):
        print_row(platform, name, rows[key], rows[key].get("ratios"))
  print("results in", FLAGS.out)


if __name__ == "__main__":
  app.run(main)
