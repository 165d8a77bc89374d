"""The prepared GPU check: one command on a GPU host, about 7.5 minutes on one H200 (estimated).

  python benchmarks/gpu_check.py [--out_dir=benchmarks/results]
      [--steps=kernels,read,scan,read_speed,train,adaptor_cost]

1. kernels (~1 min): the pallas_gpu (Triton) selective scan against `reference` on the GPU,
   forward and every gradient, at the VMamba-T stage shapes and the Vim-T shape
   (tests/scan_cases.py's MODEL_SHAPES), fp32 and bf16, on fresh random inputs, with the test
   suite's tolerances (fp32 1e-5 forward, 1e-4 gradients; bf16 1e-2);
2. read (~0.5 min): kernels.memory_read and kernels.learned_read with backend "auto" (xla on a
   GPU) against their `reference` backends, forward and every gradient (h, pos, weight, gamma,
   scale; h, w, b, gamma, scale), at Adaptor-T's shapes (benchmarks/read.py's: 16 heads, K = 4,
   the booster's stages 56x56 and 7x7, L 3136 and 49), batch 4, fp32 and bf16 (against the
   reference on the same values in fp32), on fresh random inputs, with the tolerances of
   tests/test_read.py and test_learned.py (the same as the scan's); fp32 products at full fp32
   precision: a GPU's default lets them run in TF32 (~1e-3), which is not the ops' error;
3. scan (~1 min): benchmarks/scan.py (xla and pallas_gpu, batch 128, bf16);
4. read_speed (~0.5 min): benchmarks/read.py at batch 128 (its xla backend on a GPU):
   memory_read's forward and forward+backward per stage, fp32;
5. train (~1.5 min): benchmarks/train_throughput.py for mamba_adaptor_b2 at batch 128, 224x224,
   bf16: the real train step's images/s and peak memory (no input pipeline: grain and TFDS need
   not be installed);
6. adaptor_cost (~3 min): benchmarks/adaptor_cost.py --platforms=gpu, one process per pair: the
   real train step at batch 128, bf16, of adaptor_vmamba_tiny against vmamba_tiny and of
   mamba_adaptor_b2 against b2 without adaptors ("mamba_adaptor_b2+none"): median step time of
   5, images/s, the device's peak memory and the compiled step's, and the adapted / base ratios.
The times are estimates (no GPU has run this yet): compiles dominate, about 30 small programs in
each of steps 1 and 2 and 10 in each of steps 3 and 4, and a full train step with its
initialiser (~20-40 s) once in step 5 and four times in step 6; each subprocess starts jax on
the GPU (~10-15 s); the timed runs take seconds. Steps 3-6 run in their own processes, one after
the other, with the GPU's default memory pool; this process grows its own as it needs
(XLA_PYTHON_CLIENT_PREALLOCATE=false unless set), so that it does not hold the 75% of the GPU
that a pool takes while they run. Writes gpu-check-<device>.json (the kernel and read tables and
each step's outcome, rewritten after every step), scan-<device>.json, read-gpu.json,
train-throughput-gpu.json, adaptor-cost.json and each subprocess step's log into --out_dir;
exits non-zero when a kernel or read case misses its tolerance or a step fails.

It imports only jax, flax, optax, absl and numpy beyond the repository (ml_collections and
simplejpeg too, through the training config): on a machine without them, install their wheels
first (benchmarks/README.md gives the device command).
"""
import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))  # scan_cases: the tests' inputs and oracle
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernels  # noqa: E402
from read import HEADS, POINTS, STAGES  # noqa: E402  (benchmarks/read.py: Adaptor-T's shapes)
from scan_cases import (  # noqa: E402,I001
    FWD_TOL, GRAD_TOL, MODEL_SHAPES, errors_against_reference, make_inputs, rel_err,
    within_tolerance)

F32 = jnp.float32
STEPS = ("kernels", "read", "scan", "read_speed", "train", "adaptor_cost")
READ_SHAPES = {stage: STAGES[stage][:2] for stage in ("stage1_56x56", "stage4_7x7")}  # (L, C)
READ_OPS = {  # name: the op, its oracle, its arguments (reach has no gradient)
    "memory_read": (kernels.memory_read, kernels.read.reference,
                    ("h", "pos", "weight", "gamma", "scale")),
    "learned_read": (kernels.learned_read, kernels.learned.reference,
                     ("h", "w", "b", "reach", "gamma", "scale")),
}
ADAPTOR_PAIRS = ("vmamba_tiny:adaptor_vmamba_tiny", "mamba_adaptor_b2+none:mamba_adaptor_b2")


def record(rows, row, label, start):
  """Appends a checked case's row (with its errors and ok) and its seconds; prints one line."""
  row["seconds"] = round(time.perf_counter() - start, 1)
  rows.append(row)
  errs = row["errors"]
  worst = max(errs, key=errs.get)
  print(f"{label} {'ok  ' if row['ok'] else 'FAIL'} worst {worst} {errs[worst]:.1e} "
        f"[{row['seconds']} s]", flush=True)


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
      record(rows, dict(shape=name, batch=batch, L=length, D=d_inner, G=groups, N=n_state,
                        dtype=jnp.dtype(dtype).name, with_z=vim, **flags, errors=errs,
                        ok=within_tolerance(errs, dtype)),
             f"{name:16s} {jnp.dtype(dtype).name:8s} reverse={flags['reverse']!s:5s}", start)
  return rows


@functools.partial(jax.jit, static_argnums=range(1, 6))
def read_inputs(seed, op, batch, length, channels, dtype):
  """`op`'s arguments at one stage, as Adaptor-T makes them (benchmarks/read.py's make_args,
  fresh per seed): HEADS heads = 4 routes x 4 groups of `channels`, the first two routes looking
  back and the last two ahead, group s reaching L / 2^(3 - s); POINTS points; gamma per head
  and channel, the scan's C as scale. memory_read: (h, pos, weight, gamma, scale), pos clipped
  to the sequence and every fifth of the first point's an integer; learned_read: (h, w, b,
  reach, gamma, scale), phi's logits of about unit scale."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  h = jax.random.normal(ks[0], (batch, length, HEADS, channels)).astype(dtype)
  heads = jnp.arange(HEADS)
  reach = jnp.where(heads < HEADS // 2, -1.0, 1.0) * length / 2.0 ** (3 - heads % 4)
  gamma = jax.random.normal(ks[1], (HEADS, channels))
  scale = jax.random.normal(ks[2], (batch, HEADS, length))
  if op == "learned_read":
    routes, per_route = 4, HEADS // 4
    fan_in, logits = per_route * channels, 2 * POINTS * per_route
    w = jax.random.normal(ks[3], (routes, fan_in, logits)) * fan_in ** -0.5
    return h, w, jax.random.normal(ks[4], (routes, logits)), reach, gamma, scale
  move = jax.nn.sigmoid(2.0 * jax.random.normal(ks[3], (batch, POINTS, HEADS, length)))
  pos = jnp.clip(jnp.arange(length, dtype=F32) + reach[:, None] * move, 0.0, length - 1)
  pos = pos.at[:, 0, :, ::5].set(jnp.floor(pos[:, 0, :, ::5]))
  weight = jax.nn.softmax(jax.random.normal(ks[4], (batch, POINTS, HEADS, length)), axis=1)
  return h, pos, weight, gamma, scale


def read_value_and_grads(fn, args, names, seed=9):
  """fn(*args) and the vjp of a random cotangent for every argument but reach, by "d<name>"."""
  keep = [name != "reach" for name in names]

  def f(*xs):
    rest = iter(xs)
    return fn(*(next(rest) if k else a for k, a in zip(keep, args)))

  out, vjp = jax.vjp(f, *(a for k, a in zip(keep, args) if k))
  ct = jax.random.normal(jax.random.PRNGKey(seed), out.shape).astype(out.dtype)
  return out, dict(zip((f"d{name}" for name, k in zip(names, keep) if k), vjp(ct)))


def read_errors(op, backend, args):
  """rel_err of `op` with `backend` against its reference, output ("out") and every gradient,
  and whether each is within the tests' tolerance of h's dtype. bf16 h is compared with the
  reference on the same values in fp32 (w rounded to bf16 too: phi's product takes its operands
  in h's dtype), as tests/test_read.py and test_learned.py do."""
  fn, ref, names = READ_OPS[op]
  dtype = args[0].dtype.type
  got = functools.partial(fn, backend=backend)
  if dtype == jnp.bfloat16:
    got = lambda *a, f=got: f(*a).astype(F32)
    ref = lambda h, *a, f=ref: f(h.astype(F32), *(
        x.astype(dtype).astype(F32) if name == "w" else x for name, x in zip(names[1:], a)))
  out, grads = jax.jit(functools.partial(read_value_and_grads, got, names=names))(args)
  want, want_grads = jax.jit(functools.partial(read_value_and_grads, ref, names=names))(args)
  errs = {"out": rel_err(out, want)}
  errs.update({name: rel_err(grads[name], g) for name, g in want_grads.items()})
  ok = errs["out"] <= FWD_TOL[dtype] and all(
      v <= GRAD_TOL[dtype] for name, v in errs.items() if name != "out")
  return errs, ok


def check_read(backend="auto", shapes=None, batch=4):
  """memory_read and learned_read with `backend` against their references at `shapes` ({stage:
  (L, channels per head)}, default READ_SHAPES), fp32 and bf16: a row per case."""
  rows = []
  with jax.default_matmul_precision("float32"):
    for op in READ_OPS:
      for stage, (length, channels) in (shapes or READ_SHAPES).items():
        for dtype in (jnp.float32, jnp.bfloat16):
          start = time.perf_counter()
          args = read_inputs(3000 + len(rows), op, batch, length, channels, dtype)
          errs, ok = read_errors(op, backend, args)
          name = jnp.dtype(dtype).name
          record(rows, dict(op=op, stage=stage, backend=backend, batch=batch, L=length,
                            heads=HEADS, C=channels, K=POINTS, dtype=name, errors=errs, ok=ok),
                 f"{op:12s} {stage:14s} {name:8s}", start)
  return rows


def run_step(cmds, log_path, env):
  """Runs a step's commands one after the other (each its own process) into one log; returns
  the outcome: the first non-zero exit code (else 0), seconds, log file."""
  start, returncode = time.perf_counter(), 0
  with open(log_path, "w") as log:
    for cmd in cmds:
      log.write(f"$ {' '.join(cmd)}\n")
      log.flush()
      proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False,
                            env=env)
      returncode = returncode or proc.returncode
  with open(log_path) as f:
    print(f.read()[-1500:], flush=True)
  return dict(cmd=" && ".join(" ".join(cmd) for cmd in cmds), returncode=returncode,
              seconds=round(time.perf_counter() - start, 1), log=os.path.basename(log_path))


def subprocess_steps(out_dir, name):
  """The commands of the steps that run in their own processes, by step."""
  py, out = sys.executable, lambda file: os.path.join(out_dir, file)
  return {
      "scan": [[py, os.path.join(HERE, "scan.py"), "--out", out(f"scan-{name}.json")]],
      "read_speed": [[py, os.path.join(HERE, "read.py"), "--batch=128",
                      f"--out={out('read-gpu.json')}"]],
      "train": [[py, os.path.join(HERE, "train_throughput.py"), "--models=mamba_adaptor_b2",
                 "--batch_size=128", "--noinput_pipeline",
                 f"--out={out('train-throughput-gpu.json')}"]],
      "adaptor_cost": [[py, os.path.join(HERE, "adaptor_cost.py"), "--platforms=gpu",
                        f"--pairs={pair}", "--gpu_batch=128", "--iters=5", "--redo",
                        f"--out={out('adaptor-cost.json')}"] for pair in ADAPTOR_PAIRS],
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out_dir", default=os.path.join(HERE, "results"))
  parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated, of " +
                      ",".join(STEPS))
  args = parser.parse_args()
  steps = args.steps.split(",")
  if set(steps) - set(STEPS):
    parser.error(f"unknown steps {sorted(set(steps) - set(STEPS))}; choose among {STEPS}")
  os.makedirs(args.out_dir, exist_ok=True)
  child_env = dict(os.environ, PYTHONUNBUFFERED="1")  # the subprocesses: the default GPU pool
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before the GPU starts
  device = jax.devices()[0]
  name = device.device_kind.replace(" ", "_").lower()
  print(f"{device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
  if device.platform != "gpu":
    raise SystemExit(f"gpu_check: the default device is {device.platform}, not a GPU")
  result = dict(device=device.device_kind, jax=jax.__version__, steps={},
                started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  out = os.path.join(args.out_dir, f"gpu-check-{name}.json")
  commands = subprocess_steps(args.out_dir, name)
  checks = {"kernels": check_kernels, "read": check_read}
  failed = []
  for step in (s for s in STEPS if s in steps):
    start = time.perf_counter()
    if step in checks:
      try:
        result[step] = checks[step]()
        outcome = dict(cases=len(result[step]),
                       failed=sum(not row["ok"] for row in result[step]))
      except Exception as e:  # noqa: BLE001 - a step that crashes is reported; the next runs
        traceback.print_exc()
        outcome = dict(error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
      outcome["seconds"] = round(time.perf_counter() - start, 1)
      bad = outcome.get("failed", 1)
    else:
      outcome = run_step(commands[step], os.path.join(args.out_dir, f"gpu-check-{step}.log"),
                         child_env)
      bad = outcome["returncode"]
    result["steps"][step] = outcome
    if bad:
      failed.append(step)
    result["failed"] = failed
    with open(out, "w") as f:  # after every step: a run stopped by a time limit keeps its steps
      json.dump(result, f, indent=1)
  print(f"wrote {out}; " + (f"FAILED: {failed}" if failed else "every step passed"))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
