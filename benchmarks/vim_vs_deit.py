"""Vim against DeiT in batch inference as the resolution grows: the Vim paper's headline.

  JAX_PLATFORMS=cpu python benchmarks/vim_vs_deit.py [--sizes=tiny,small] [--attention=plain,fused]
      [--resolutions=224,512,768,1024,1248] [--platforms=device,tpu] [--batch=2]
      [--dtype=float32] [--warmup=1] [--iters=3] [--tpu_chip=v5e] [--tpu_batch=8]
      [--tpu_dtype=bfloat16] [--fresh_process=auto] [--out=PATH] [--redo]

The Vim paper (Zhu et al. 2024): "Vim is 2.8x faster than DeiT and saves 86.8% GPU memory when
performing batch inference to extract features on images with a resolution of 1248x1248" (on a
GPU, against DeiT without fused attention). Per size (tiny: vim_tiny vs deit_tiny, small:
vim_small vs deit_small) and resolution R it runs the eval-mode forward (logits) of Vim and of
DeiT with each --attention: "plain" (explicit softmax einsums, the paper's DeiT) and "fused"
(jax.nn.dot_product_attention with implementation=None; what that resolves to on each platform
is read off the program: a cuDNN or other attention custom call, or none = XLA's einsums).

Resolution: the models are the 224x224 presets (a 14x14 patch grid) run on RxR images; each
forward resizes the learned position embedding to the R/16 grid (model.position_embedding,
bilinear), as a 224-trained checkpoint is run at another resolution. Both models have
(R/16)^2 + 1 tokens: 197 at 224, 6085 at 1248. Params float32, compute in --dtype.

  device  on jax's default device (CPU here; a GPU host runs the same command): the jitted
          forward on --batch random images, the median of --iters timed calls after --warmup,
          as images/s. Memory: where the device reports memory_stats() (GPU, TPU), the peak
          bytes in use of a fresh process that ran only this row (--fresh_process=auto); on the
          CPU, which reports none, the compiled memory analysis: arguments + outputs +
          temporaries of the forward (params, images, logits and XLA's temporary buffers), a
          static figure, not a measured peak.
  tpu     deviceless (libtpu's compiler on this host, adaptor_jax.training.aot) for one chip of
          --tpu_chip at --tpu_batch images and --tpu_dtype: the compiled memory analysis
          (temporaries; HBM = arguments + temporaries + outputs), FLOPs and bytes accessed per
          image from the cost analysis. The Vim scan there is the Pallas TPU (Mosaic) kernel
          (scan_backend "auto"), whose work XLA's cost analysis does not count (no cost
          estimate): Vim's TPU FLOPs and bytes are the rest of the model. A compile that fails
          (out of memory included) is kept as a row with the compiler's message.
Each DeiT row also gives the pair's ratios against the Vim row of the same platform, size,
resolution, batch and dtype: speedup = DeiT time / Vim time (device rows) and memory saving =
1 - Vim memory / DeiT memory (also on temporaries alone). Rows are merged by key into
benchmarks/results/vim-vs-deit.json after each row (a stopped run continues; --redo measures
again), and a table is printed.
"""
import concurrent.futures
import multiprocessing
import os
import re
import time

# A GPU parent process would otherwise reserve 75% of the GPU that the row processes measure.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

import results_file  # noqa: E402
from adaptor_jax.training import aot, config as config_lib, sharding, steps  # noqa: E402

FLAGS = flags.FLAGS
SIZES = ("tiny", "small")
ATTENTION = ("plain", "fused")
PLATFORMS = ("device", "tpu")
flags.DEFINE_list("sizes", list(SIZES), "pairs: tiny (vim_tiny vs deit_tiny), small")
flags.DEFINE_list("attention", list(ATTENTION), "DeiT attention: plain (einsums), fused")
flags.DEFINE_list("resolutions", ["224", "512", "768", "1024", "1248"],
                  "square image sides, multiples of the patch size 16")
flags.DEFINE_list("platforms", list(PLATFORMS), "device (timed here), tpu (deviceless compile)")
flags.DEFINE_integer("batch", None, "images per forward on the device; default 2 on CPU, 32 else")
flags.DEFINE_enum("dtype", "float32", config_lib.DTYPES, "compute dtype on the device")
flags.DEFINE_integer("warmup", 1, "untimed calls after compilation")
flags.DEFINE_integer("iters", 3, "timed calls (the median is reported)")
flags.DEFINE_enum("tpu_chip", "v5e", sorted(aot.CHIPS), "TPU chip of the deviceless compile")
flags.DEFINE_integer("tpu_batch", 8, "per-chip batch of the TPU compile")
flags.DEFINE_enum("tpu_dtype", "bfloat16", config_lib.DTYPES, "compute dtype of the TPU compile")
flags.DEFINE_enum("fresh_process", "auto", ["auto", "yes", "no"],
                  "each device row in its own process (auto: where the device reports peak "
                  "memory, which never resets within a process)")
flags.DEFINE_string("out", os.path.join(results_file.RESULTS, "vim-vs-deit.json"),
                    "results file (rows merged in)")
flags.DEFINE_bool("redo", False, "measure rows the results file already has")

NUM_CLASSES = 1000
PATCH = 16


def _check_list(name, allowed):
  flags.register_validator(name, lambda values: values and set(values) <= set(allowed),
                           f"--{name}: choose from {','.join(allowed)}")


_check_list("sizes", SIZES)
_check_list("attention", ATTENTION)
_check_list("platforms", PLATFORMS)
flags.register_validator(
    "resolutions",
    lambda values: bool(values) and all(v.isdigit() and int(v) > 0 and int(v) % PATCH == 0
                                        for v in values),
    f"--resolutions: positive multiples of {PATCH}, comma-separated")
for _name in ("batch", "tpu_batch", "iters"):
  flags.register_validator(_name, lambda v: v is None or v >= 1, f"--{_name}: at least 1")
flags.register_validator("warmup", lambda v: v >= 0, "--warmup: at least 0")


def models(size):
  """The pair's names: the Vim preset, then DeiT with each --attention ("deit_tiny+plain")."""
  return [f"vim_{size}"] + [f"deit_{size}+{a}" for a in FLAGS.attention]


def forward_program(name, dtype):
  """(config, the eval-mode forward(params, images) -> logits, abstract params as a pure dict)
  of `name`, a preset or "deit_*+ATTENTION", built as the training code builds it."""
  model, _, attention = name.partition("+")
  c = config_lib.default_config()
  c.model, c.dtype, c.num_classes = model, dtype, NUM_CLASSES
  if attention:
    c.model_overrides = ml_collections.ConfigDict(dict(attention=attention))
  net, abstract, _ = steps.make_net(c, NUM_CLASSES)
  return c, lambda params, x: net.model(params, train=False)(x), nnx.to_pure_dict(abstract)


CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"|stablehlo\.custom_call @([\w$.-]+)')


def custom_call_targets(text):
  """{custom call target: count} in an HLO or StableHLO module's text."""
  counts = {}
  for match in CUSTOM_CALL.finditer(text):
    target = match.group(1) or match.group(2)
    counts[target] = counts.get(target, 0) + 1
  return counts


def kernels_used(name, lowered_calls, compiled_calls):
  """What ran for the attention (DeiT) or the scan (Vim), read off the programs' custom calls."""
  calls = sorted({**lowered_calls, **compiled_calls})
  if name.startswith("deit"):
    fused = [t for t in calls if "cudnn" in t.lower() or "fmha" in t.lower()
             or "attention" in t.lower()]
    return dict(attention_impl=f"custom call {', '.join(fused)}" if fused else
                "XLA: no attention custom call (dot products + softmax)")
  pallas = [t for t in calls if t in ("tpu_custom_call", "mosaic_gpu") or "triton" in t]
  return dict(scan_impl=f"Pallas custom call {', '.join(pallas)}" if pallas else
              "XLA: no scan custom call (kernels/xla.py)")


def describe(name, lowered, compiled, batch):
  """The row fields every platform shares: memory analysis, cost analysis, custom calls."""
  mem, cost = aot.memory(compiled), aot.cost(compiled)
  lowered_calls = custom_call_targets(lowered.as_text())
  compiled_calls = custom_call_targets(compiled.as_text())
  return dict(memory_analysis=mem, temporaries_mib=mem["temporaries"] / 2**20,
              gflops_per_image=cost["flops"] / batch / 1e9,
              gbytes_per_image=cost["bytes"] / batch / 1e9,
              lowered_custom_calls=lowered_calls, compiled_custom_calls=compiled_calls,
              **kernels_used(name, lowered_calls, compiled_calls))


def failure(e, start):
  """A row for a compile or run that failed: the compiler's message, kept."""
  text = str(e)
  return dict(error=f"{type(e).__name__}: {text[:1500]}", oom="RESOURCE_EXHAUSTED" in text,
              seconds=round(time.perf_counter() - start, 1))


def measure_device(name, size, batch, dtype, warmup, iters):
  """One device row (no FLAGS: it may run in a fresh process)."""
  config, forward, _ = forward_program(name, dtype)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(steps.build_model(config, NUM_CLASSES),
                                                      nnx.Param)))()
  images = jax.random.normal(jax.random.PRNGKey(0), (batch, size, size, 3), jnp.float32)
  device = jax.devices()[0]
  row = dict(platform=device.platform, device_kind=device.device_kind)
  start = time.perf_counter()
  try:
    lowered = jax.jit(forward).lower(params, images)
    compiled = lowered.compile()
    row["compile_s"] = round(time.perf_counter() - start, 1)
    # results_file.timed_steps runs (state, batch) -> (state, out) steps: params pass through
    _, logits, times = results_file.timed_steps(lambda p, x: (p, compiled(p, x)), params,
                                                images, warmup, iters)
  except jax.errors.JaxRuntimeError as e:  # out of memory, at compile or run time
    return dict(row, **failure(e, start))
  if not bool(jnp.isfinite(logits).all()):
    raise FloatingPointError(f"{name} at {size}x{size}: non-finite logits")
  row.update(describe(name, lowered, compiled, batch), times_s=times,
             images_per_s=batch / results_file.median(times))
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row.update(memory_bytes=int(stats["peak_bytes_in_use"]),
               memory_source="peak_bytes_in_use of a process that ran this row alone")
  else:
    row.update(memory_bytes=row["memory_analysis"]["hbm"],
               memory_source="compiled memory analysis: arguments + outputs + temporaries")
  return row


def measure_tpu(name, size):
  """One TPU row: the forward compiled for one chip of --tpu_chip."""
  devices = aot.topology_devices(FLAGS.tpu_chip, aot.CHIPS[FLAGS.tpu_chip].slice_shape(1))
  _, forward, abstract = forward_program(name, FLAGS.tpu_dtype)
  replicated = sharding.replicated(jax.sharding.Mesh(devices, ("data",)))
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                        abstract)
  b = FLAGS.tpu_batch
  images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=replicated)
  row = dict(platform="tpu", device_kind=FLAGS.tpu_chip)
  start = time.perf_counter()
  try:
    lowered = jax.jit(forward).lower(params, images)
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    return dict(row, **failure(e, start))
  row.update(describe(name, lowered, compiled, b), compile_s=round(time.perf_counter() - start, 1))
  row.update(memory_bytes=row["memory_analysis"]["hbm"],
             memory_source="compiled memory analysis: arguments + outputs + temporaries",
             hbm_capacity_gib=aot.CHIPS[FLAGS.tpu_chip].hbm_gib)
  return row


def measure_fresh(*args):
  """measure_device in a process of its own: a clean peak-memory counter for the row."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    try:
      return pool.submit(measure_device, *args).result()
    except concurrent.futures.process.BrokenProcessPool as e:  # killed, e.g. out of host memory
      return dict(error=f"the row's process died: {e}", oom=None)


def device_setup():
  """(platform label for the keys, batch, whether rows run in fresh processes)."""
  device = jax.devices()[0]
  label = device.platform if device.platform == "cpu" else (
      f"{device.platform}:{re.sub(r'[^a-z0-9]+', '_', device.device_kind.lower())}")
  batch = FLAGS.batch or (2 if device.platform == "cpu" else 32)
  fresh = FLAGS.fresh_process == "yes" or (
      FLAGS.fresh_process == "auto" and "peak_bytes_in_use" in (device.memory_stats() or {}))
  return label, batch, fresh


def row_key(label, name, size, batch, dtype):
  return f"{label}/{name}/{size}px/b{batch}/{dtype}"


def _saving(vim, deit):
  """1 - vim / deit; None when DeiT needs none (XLA:TPU may fuse a whole forward: 0 bytes of
  temporaries)."""
  return 1 - vim / deit if deit else None


def _percent(value):
  return "n/a" if value is None else f"{value:.1%}"


def add_ratios(rows, keys):
  """Puts each DeiT row's ratios against the Vim row (keys[0]) into the DeiT row."""
  vim = rows.get(keys[0], {"error": "not measured"})
  for key in keys[1:]:
    deit = rows.get(key, {"error": "not measured"})
    deit.pop("vs_vim", None)
    if "error" in vim or "error" in deit:
      continue
    ratios = dict(memory_saving=_saving(vim["memory_bytes"], deit["memory_bytes"]),
                  temporaries_saving=_saving(vim["temporaries_mib"], deit["temporaries_mib"]))
    if "images_per_s" in vim:
      ratios["speedup"] = vim["images_per_s"] / deit["images_per_s"]  # DeiT time / Vim time
    deit["vs_vim"] = ratios


def print_row(key, row):
  if "error" in row:
    print(f"{key:44s} FAILED {row['error'][:200]}", flush=True)
    return
  speed = f"{row['images_per_s']:9.2f} img/s" if "images_per_s" in row else " " * 15
  line = (f"{key:44s} {speed} memory {row['memory_bytes'] / 2**20:9.1f} MiB temporaries "
          f"{row['temporaries_mib']:9.1f} MiB {row['gflops_per_image']:7.1f} GFLOP/img "
          f"{row['gbytes_per_image']:6.2f} GB/img")
  ratios = row.get("vs_vim")
  if ratios:
    speedup = f"Vim {ratios['speedup']:.2f}x faster, " if "speedup" in ratios else ""
    line += (f"  | {speedup}saves {_percent(ratios['memory_saving'])} memory, "
             f"{_percent(ratios['temporaries_saving'])} temporaries")
  print(line, flush=True)


def main(argv):
  del argv
  results = results_file.load(FLAGS.out)
  rows = results["rows"]
  for platform in FLAGS.platforms:
    if platform == "device":
      label, batch, fresh = device_setup()
      dtype = FLAGS.dtype
      print(f"device {label}: batch {batch}, {dtype}, warm-up {FLAGS.warmup}, median of "
            f"{FLAGS.iters}, {'a process per row' if fresh else 'in process'}", flush=True)
    else:
      label, batch, dtype = f"tpu:{FLAGS.tpu_chip}", FLAGS.tpu_batch, FLAGS.tpu_dtype
      print(f"tpu {FLAGS.tpu_chip} (deviceless): per-chip batch {batch}, {dtype}", flush=True)
    for size_name in FLAGS.sizes:
      for size in map(int, FLAGS.resolutions):
        keys = [row_key(label, name, size, batch, dtype) for name in models(size_name)]
        for name, key in zip(models(size_name), keys):
          if key in rows and not FLAGS.redo:
            continue
          if platform == "tpu":
            try:
              row = measure_tpu(name, size)
            except ValueError as e:  # no libtpu, or it does not know the topology
              raise SystemExit(f"vim_vs_deit.py: {e}") from None
          else:
            args = (name, size, batch, dtype, FLAGS.warmup, FLAGS.iters)
            row = measure_fresh(*args) if fresh else measure_device(*args)
          rows[key] = dict(row, model=name, resolution=size, tokens=(size // PATCH) ** 2 + 1,
                           batch=batch, dtype=dtype)
          add_ratios(rows, keys)
          results_file.save(FLAGS.out, results, jax=jax.__version__,
                            host_cpu_count=os.cpu_count())
        for key in keys:
          print_row(key, rows[key])
  print("results in", FLAGS.out)


if __name__ == "__main__":
  app.run(main)
