"""Times `kernels.selective_scan` forward and forward+backward on the current device.

  python benchmarks/scan.py [--batch=128] [--iters=10] [--backends=xla,reference]

Shapes: VMamba-T stage 1 (L 3136, D 384 = 4 routes x 96, G 4, N 1) and Vim-T (L 197, D 384, N 16),
bf16 inputs, batch 128 by default. For each backend the device supports it reports the median time
of --iters runs after warm-up, the bytes the op must move (each input read once, each output
written once; forward+backward: the forward, then the backward reading the inputs and dy again and
writing every gradient) and the GB/s that implies, next to the device's measured copy bandwidth.
Writes benchmarks/results/scan-<device>.json.
"""
import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

import kernels

SHAPES = {  # name: (L, D, G, N)
    "vmamba_t_stage1": (3136, 384, 4, 1),
    "vim_t": (197, 384, 1, 16),
}
PLATFORM_BACKENDS = {"cpu": ["reference", "xla"], "gpu": ["xla", "pallas_gpu"],
                     "tpu": ["xla", "pallas_tpu"]}


def median_seconds(fn, args, iters):
  jax.block_until_ready(fn(*args))  # compile
  jax.block_until_ready(fn(*args))  # warm
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth(iters):
  """Bytes read + written per second by an elementwise op over 1 GiB (256 MiB on the CPU)."""
  n = (1 << 26) if jax.default_backend() == "cpu" else (1 << 28)
  x = jnp.ones((n,), jnp.float32)
  seconds = median_seconds(jax.jit(lambda x: x + 1.0), (x,), iters)
  return 2 * x.nbytes / seconds


def make_args(batch, length, d_inner, groups, n_state, dtype):
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  act = lambda k: jax.random.normal(k, (batch, length, d_inner), jnp.float32).astype(dtype)
  bc = lambda k: jax.random.normal(k, (batch, length, groups, n_state), jnp.float32).astype(dtype)
  A = -jnp.exp(jax.random.normal(ks[2], (d_inner, n_state), jnp.float32))
  return dict(u=act(ks[0]), delta=act(ks[1]) * 0.1, A=A, B=bc(ks[3]), C=bc(ks[4]),
              D=jnp.ones((d_inner,)), z=act(ks[5]), delta_bias=jnp.zeros((d_inner,)))


def op_bytes(args):
  """(forward, forward+backward) bytes: the minimum HBM traffic of the fused op."""
  act = args["u"].nbytes
  read = sum(args[k].nbytes for k in ("u", "delta", "B", "C", "z"))
  fwd = read + act  # + y
  bwd = read + act + read  # inputs again, dy, every gradient of the big inputs
  return fwd, fwd + bwd


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--backends", default=None, help="comma-separated; default per platform")
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--out", default=None)
  flags = parser.parse_args()

  platform = jax.default_backend()
  device = jax.devices()[0].device_kind.replace(" ", "_").lower()
  backends = flags.backends.split(",") if flags.backends else PLATFORM_BACKENDS[platform]
  copy_bps = copy_bandwidth(flags.iters)
  print(f"device {device} ({platform}), jax {jax.__version__}, copy bandwidth "
        f"{copy_bps / 1e9:.1f} GB/s")
  rows = []
  for shape in flags.shapes.split(","):
    length, d_inner, groups, n_state = SHAPES[shape]
    args = make_args(flags.batch, length, d_inner, groups, n_state, jnp.bfloat16)
    fwd_bytes, train_bytes = op_bytes(args)
    for backend in backends:
      scan = lambda a: kernels.selective_scan(**a, delta_softplus=True, backend=backend)
      fwd = jax.jit(scan)
      grad = jax.jit(jax.grad(
          lambda a: jnp.sum(scan(a).astype(jnp.float32)), allow_int=True))
      t_fwd = median_seconds(fwd, (args,), flags.iters)
      t_train = median_seconds(grad, (args,), flags.iters)
      row = dict(shape=shape, backend=backend, batch=flags.batch, L=length, D=d_inner, G=groups,
                 N=n_state, dtype="bfloat16", fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_train * 1e3,
                 fwd_GBps=fwd_bytes / t_fwd / 1e9, fwd_bwd_GBps=train_bytes / t_train / 1e9,
                 fwd_frac_of_copy=fwd_bytes / t_fwd / copy_bps)
      rows.append(row)
      print(f"{shape:16s} {backend:10s} fwd {row['fwd_ms']:9.2f} ms {row['fwd_GBps']:7.1f} GB/s "
            f"({100 * row['fwd_frac_of_copy']:.1f}% of copy)   fwd+bwd {row['fwd_bwd_ms']:9.2f} ms "
            f"{row['fwd_bwd_GBps']:7.1f} GB/s", flush=True)
  for row in rows:  # speed-up over the xla backend on the same device and shape
    base = [r for r in rows if r["shape"] == row["shape"] and r["backend"] == "xla"]
    if base:
      row["fwd_speedup_vs_xla"] = base[0]["fwd_ms"] / row["fwd_ms"]
      row["fwd_bwd_speedup_vs_xla"] = base[0]["fwd_bwd_ms"] / row["fwd_bwd_ms"]
  out = flags.out or os.path.join(os.path.dirname(__file__), "results", f"scan-{device}.json")
  with open(out, "w") as f:
    json.dump(dict(device=device, platform=platform, jax=jax.__version__,
                   copy_GBps=copy_bps / 1e9, iters=flags.iters, results=rows), f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
