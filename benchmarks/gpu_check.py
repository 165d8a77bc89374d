"""The prepared GPU check: one command on a GPU host, about 6 minutes on one H200.

  python benchmarks/gpu_check.py [--out_dir=benchmarks/results] [--steps=kernels,scan,train]

1. kernels: the pallas_gpu (Triton) selective scan against `reference` on the GPU, forward and
   every gradient, at the VMamba-T stage shapes and the Vim-T shape (tests/scan_cases.py's
   MODEL_SHAPES), fp32 and bf16, on fresh random inputs, with the test suite's tolerances
   (fp32 1e-5 forward, 1e-4 gradients; bf16 1e-2);
2. scan: benchmarks/scan.py (xla and pallas_gpu, batch 128, bf16);
3. train: benchmarks/train_throughput.py for mamba_adaptor_b2 at batch 128, 224x224, bf16: the
   real train step's images/s and peak memory (no input pipeline: grain and TFDS need not be
   installed).
Steps 2 and 3 run in their own processes. Writes gpu-check-<device>.json (the kernel table and
each step's outcome), scan-<device>.json and train-throughput-gpu.json into --out_dir; exits
non-zero when a kernel case misses its tolerance or a step fails.

It imports only jax, flax, optax, absl and numpy beyond the repository (ml_collections and
simplejpeg too, through the training config): on a machine without them, install their wheels
first (benchmarks/README.md gives the device command).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))  # scan_cases: the tests' inputs and oracle
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from scan_cases import MODEL_SHAPES, errors_against_reference, make_inputs, within_tolerance  # noqa: E402,I001


def check_kernels():
  """Every MODEL_SHAPES case in fp32 and bf16: errors against the reference, pass or fail."""
  rows = []
  for i, (name, (batch, length, d_inner, groups, n_state)) in enumerate(MODEL_SHAPES.items()):
    for dtype in (jnp.float32, jnp.bfloat16):
      start = time.perf_counter()
      vim = name.startswith("vim")
      inputs = make_inputs(1000 + len(rows), batch, length, d_inner, n_state, groups, dtype,
                           with_z=vim)
      flags = dict(delta_softplus=True, reverse=bool(i % 2))
      errs, _ = errors_against_reference("pallas_gpu", inputs, **flags)
      ok = within_tolerance(errs, dtype)
      rows.append(dict(shape=name, batch=batch, L=length, D=d_inner, G=groups, N=n_state,
                       dtype=jnp.dtype(dtype).name, with_z=vim, **flags, errors=errs, ok=ok,
                       seconds=round(time.perf_counter() - start, 1)))
      worst = max(errs, key=errs.get)
      print(f"{name:16s} {jnp.dtype(dtype).name:8s} reverse={flags['reverse']!s:5s} "
            f"{'ok  ' if ok else 'FAIL'} worst {worst} {errs[worst]:.1e} "
            f"[{rows[-1]['seconds']} s]", flush=True)
  return rows


def run_step(cmd, log_path):
  """Runs a benchmark script; returns its outcome (exit code, seconds, log file)."""
  start = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
  with open(log_path) as f:
    tail = f.read()[-1500:]
  print(tail, flush=True)
  return dict(cmd=" ".join(cmd), returncode=proc.returncode,
              seconds=round(time.perf_counter() - start, 1), log=os.path.basename(log_path))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out_dir", default=os.path.join(HERE, "results"))
  parser.add_argument("--steps", default="kernels,scan,train")
  args = parser.parse_args()
  steps = args.steps.split(",")
  os.makedirs(args.out_dir, exist_ok=True)
  device = jax.devices()[0]
  name = device.device_kind.replace(" ", "_").lower()
  print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
  if device.platform != "gpu":
    raise SystemExit(f"gpu_check: the default device is {device.platform}, not a GPU")
  result = dict(device=device.device_kind, jax=jax.__version__, steps={},
                started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  failed = []
  if "kernels" in steps:
    result["kernels"] = check_kernels()
    if not all(r["ok"] for r in result["kernels"]):
      failed.append("kernels")
  py = sys.executable
  commands = {
      "scan": [py, os.path.join(HERE, "scan.py"), "--out",
               os.path.join(args.out_dir, f"scan-{name}.json")],
      "train": [py, os.path.join(HERE, "train_throughput.py"), "--models=mamba_adaptor_b2",
                "--batch_size=128", "--noinput_pipeline",
                f"--out={os.path.join(args.out_dir, 'train-throughput-gpu.json')}"],
  }
  for step in ("scan", "train"):
    if step in steps:
      result["steps"][step] = run_step(commands[step],
                                       os.path.join(args.out_dir, f"gpu-check-{step}.log"))
      if result["steps"][step]["returncode"]:
        failed.append(step)
  result["failed"] = failed
  out = os.path.join(args.out_dir, f"gpu-check-{name}.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}; " + (f"FAILED: {failed}" if failed else "every step passed"))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
