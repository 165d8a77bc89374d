"""Does a config fit a TPU chip, and how fast could it train? Deviceless: the real TPU compiler.

  python benchmarks/tpu_fit.py [--models=mamba_adaptor_b2,...] [--chips=v5e,v4,v5p]
      [--batches=32,64,128] [--remat=none,full,matmuls] [--chips_per_slice=4] [--pod=v5e:256]
      [--image_size=224] [--dtype=bfloat16] [--read_backend=pallas_tpu|xla] [--out=PATH] [--redo]

For every (model, chip, per-chip batch, remat policy) it compiles the real train step
(adaptor_jax.training.aot.compile_train_step: steps.make_train_step as training builds it, the
configs/ recipe's optimizer, EMA, on-device augmentation, the Mosaic kernels) for a slice of
--chips_per_slice chips of that kind, data parallel, with libtpu's compiler on this CPU host,
and records from the compiled program, per chip:
  HBM        arguments + temporaries + outputs - aliases (the compiled memory analysis), against
             the chip's capacity; a program that does not fit fails to compile with XLA:TPU's
             out-of-memory report, recorded (fits false) with the size it gives, a lower bound
             on what the step needs;
  cost       FLOPs and bytes accessed per image (XLA's cost analysis of the optimized program);
  roofline   a bound on training images/s per chip: 1 / max(FLOPs / peak FLOP/s, bytes / HBM
             bandwidth), the chips' published figures (aot.CHIPS); a bound, not a measurement.
An upernet_* preset compiles the segmentation train step (pixel labels, 150 classes; pass
--image_size=512 for ADE20K's crop). --read_backend picks the Adaptor-T read's kernels
(kernels.memory_read / learned_read; it sets $ADAPTOR_READ_BACKEND, which it defaults to:
"auto" compiles pallas_tpu, the Mosaic kernels, for TPU); each row records it as read_backend,
and a row key ends in /read_<backend> unless it is pallas_tpu. --pod adds one pod-sized row per
model: the slice (e.g. v5e:256, a 16x16 v5e) with the mesh (data, fsdp) = (chips / 16, 16) at
the recipe's global batch of 1024, to check that the step compiles and that params and optimizer
state are sharded (their bytes per chip against the unsharded total).

Results go into benchmarks/results/tpu-fit.json, one entry per row key; rows already there are
kept and not compiled again (unless --redo), so a long run can be stopped and continued. A
full-size train step takes 5-20 minutes to compile on a 2-core host.
"""
import os
import re
import time

import jax
import ml_collections
from absl import app, flags

import results_file
from adaptor_jax.models import registry
from adaptor_jax.training import aot, config as config_lib
from kernels import read as read_lib

FLAGS = flags.FLAGS
MODELS = ["mamba_adaptor_b1", "mamba_adaptor_b2", "vmamba_tiny", "vmamba_small", "vmamba_base",
          "adaptor_vmamba_tiny", "adaptor_vmamba_small", "adaptor_vmamba_base"]
flags.DEFINE_list("models", MODELS, "presets")
flags.DEFINE_list("chips", sorted(aot.CHIPS), "chip kinds (aot.CHIPS)")
flags.DEFINE_list("batches", ["32", "64", "128"], "per-chip batch sizes")
flags.DEFINE_list("remat", ["none", "full", "matmuls"], "config.remat policies")
flags.DEFINE_integer("chips_per_slice", 4, "chips of the data-parallel slice the rows compile for")
flags.DEFINE_string("pod", "", "CHIP:N for the pod rows, e.g. v5e:256; '' for none")
flags.DEFINE_string("pod_remat", "none", "config.remat of the pod rows")
flags.DEFINE_integer("image_size", 224, "square input side")
flags.DEFINE_enum("dtype", "bfloat16", config_lib.DTYPES, "compute dtype (config.dtype)")
flags.DEFINE_enum("read_backend", None, ["auto", "pallas_tpu", "xla"],
                  "backend of the read kernels (sets $ADAPTOR_READ_BACKEND; default: that "
                  "variable, else auto, which is pallas_tpu on TPU)")
flags.DEFINE_string("out", os.path.join(results_file.RESULTS, "tpu-fit.json"),
                    "results file (rows are merged in)")
flags.DEFINE_bool("redo", False, "compile rows that the results file already has")

RECIPE_BATCH = 1024  # configs/b1.py, b2.py, vmamba_*.py (config.default_config)
# XLA:TPU's out-of-memory reports: "... HLO temporaries (360.85G) exceeds available HBM
# (15.75G)" (temporaries alone past the chip), "Used 20.5G of 15.75G hbm" (everything).
OOM = [re.compile(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM"),
       re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")]


def make_config(model, remat, mesh):
  c = config_lib.default_config()
  c.model, c.remat, c.dtype = model, remat, FLAGS.dtype
  c.task = registry.task_of(model)  # upernet_*: segmentation (pixel labels), ADE20K's classes
  c.data.image_size = FLAGS.image_size
  c.num_classes = 150 if c.task == "segmentation" else 1000
  c.mesh = ml_collections.ConfigDict(dict(data=mesh[0], fsdp=mesh[1]))
  return c


def _gib(value, unit):
  return float(value) * 1024.0 ** ("KMGT".index(unit) - 2)


def compile_row(model, chip, chips, mesh, per_chip_batch, remat):
  """One row: the compiled step's report, or the out-of-memory failure."""
  devices = aot.topology_devices(chip, aot.CHIPS[chip].slice_shape(chips))
  config = make_config(model, remat, mesh)
  row = dict(model=model, chip=chip, chips=chips, mesh=dict(data=mesh[0], fsdp=mesh[1]),
             per_chip_batch=per_chip_batch, global_batch=per_chip_batch * chips, remat=remat,
             image_size=FLAGS.image_size, dtype=FLAGS.dtype, read_backend=read_backend())
  start = time.time()
  try:
    compiled, state = aot.compile_train_step(config, devices, per_chip_batch)
  except jax.errors.JaxRuntimeError as e:
    found = [m for m in (p.search(str(e)) for p in OOM) if m]
    if "RESOURCE_EXHAUSTED" not in str(e) or not found:
      raise
    # at least this much: the report gives the temporaries, or the total used
    row.update(fits=False, hbm_gib=_gib(*found[0].groups()[:2]),
               hbm_capacity_gib=aot.CHIPS[chip].hbm_gib,
               error=str(e).splitlines()[0][:300], compile_s=round(time.time() - start, 1))
    return row
  row.update(aot.report(compiled, chip, per_chip_batch), compile_s=round(time.time() - start, 1))
  whole, per_chip = aot.state_bytes(state)
  row.update(state_gib=whole / 2**30, state_gib_per_chip=per_chip / 2**30)
  return row


def read_backend():
  """The read kernels' backend that the TPU program compiles: pallas_tpu for "auto"."""
  name = os.environ.get(read_lib.ENV_VAR, "auto")
  return "pallas_tpu" if name == "auto" else name


def row_key(model, chip, chips, mesh, per_chip_batch, remat):
  read = "" if read_backend() == "pallas_tpu" else f"/read_{read_backend()}"
  return (f"{model}/{chip}x{chips}/data{mesh[0]}_fsdp{mesh[1]}/b{per_chip_batch}/{remat}/"
          f"{FLAGS.image_size}px/{FLAGS.dtype}{read}")


def plan():
  """(key, compile_row arguments) of every row asked for, the pod rows last."""
  rows = []
  for model in FLAGS.models:
    for chip in FLAGS.chips:
      for batch in map(int, FLAGS.batches):
        for remat in FLAGS.remat:
          args = (model, chip, FLAGS.chips_per_slice, (FLAGS.chips_per_slice, 1), batch, remat)
          rows.append((row_key(*args), args))
  if FLAGS.pod:
    chip, chips = FLAGS.pod.split(":")
    chips = int(chips)
    fsdp = min(16, chips)
    for model in FLAGS.models:
      args = (model, chip, chips, (chips // fsdp, fsdp), RECIPE_BATCH // chips, FLAGS.pod_remat)
      rows.append((row_key(*args), args))
  return rows


def print_row(row):
  fit = "fits" if row["fits"] else "OOM"
  line = (f"{row['model']:21s} {row['chip']:4s} x{row['chips']:<3d} b{row['per_chip_batch']:<4d} "
          f"{row['remat']:8s} {row.get('read_backend', 'pallas_tpu'):10s} "
          f"HBM {row['hbm_gib']:6.2f} / {row['hbm_capacity_gib']:3.0f} GiB "
          f"{fit:4s}")
  if row["fits"]:
    line += (f" {row['gflops_per_image']:6.1f} GFLOP/img {row['gbytes_per_image']:7.2f} GB/img "
             f"<= {row['roofline_images_per_s']:7.1f} img/s ({row['bound_by']})")
  print(line + f"  [{row['compile_s']:.0f} s]", flush=True)


def main(argv):
  del argv
  if FLAGS.read_backend:
    os.environ[read_lib.ENV_VAR] = FLAGS.read_backend
  results = results_file.load(FLAGS.out)
  rows = results["rows"]
  for key, args in plan():
    if key in rows and not FLAGS.redo:
      print_row(rows[key])
      continue
    rows[key] = compile_row(*args)
    print_row(rows[key])
    results_file.save(FLAGS.out, results, jax=jax.__version__, libtpu=_libtpu_version(),
                      host_cpu_count=os.cpu_count(),
                      chips={name: vars(c) for name, c in aot.CHIPS.items()})
  print("results in", FLAGS.out)


def _libtpu_version():
  from importlib import metadata  # noqa: PLC0415
  return metadata.version("libtpu")


if __name__ == "__main__":
  app.run(main)
