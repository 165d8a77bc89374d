"""How the xla backend's chunk size and in-chunk scan were chosen.

  python benchmarks/scan_xla_variants.py [--batch=8] [--iters=3]

Times forward+backward of the xla backend at the scan benchmark's two shapes for chunk sizes
8..128, with the in-chunk recurrence as a parallel `associative_scan` (what kernels/xla.py does)
or as a sequential `lax.scan` unrolled 8 steps (patched in here). Writes
benchmarks/results/scan-xla-variants-<device>.json.
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp

import kernels
from kernels import xla
from scan import SHAPES, make_args, median_seconds


def sequential_scan(a_BTDN, b_BTDN, h0_BDN, reverse):
  def step(h_BDN, ab):
    h_BDN = ab[0] * h_BDN + ab[1]
    return h_BDN, h_BDN
  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  _, h_TBDN = jax.lax.scan(step, h0_BDN, (time_major(a_BTDN), time_major(b_BTDN)),
                           reverse=reverse, unroll=8)
  return jnp.moveaxis(h_TBDN, 0, 1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--iters", type=int, default=3)
  flags = parser.parse_args()
  device = jax.devices()[0].device_kind.replace(" ", "_").lower()
  inner_scans = {"associative": xla._linear_scan, "sequential": sequential_scan}
  chunk0 = xla.CHUNK
  rows = []
  for shape, (length, d_inner, groups, n_state) in SHAPES.items():
    args = make_args(flags.batch, length, d_inner, groups, n_state, jnp.bfloat16)
    for inner, fn in inner_scans.items():
      for chunk in (8, 16, 32, 64, 128):
        xla._linear_scan, xla.CHUNK = fn, chunk
        scan = lambda a: kernels.selective_scan(**a, delta_softplus=True, backend="xla")
        fwd = jax.jit(scan)
        grad = jax.jit(jax.grad(lambda a: jnp.sum(scan(a).astype(jnp.float32))))
        row = dict(shape=shape, inner=inner, chunk=chunk, batch=flags.batch,
                   fwd_ms=1e3 * median_seconds(fwd, (args,), flags.iters),
                   fwd_bwd_ms=1e3 * median_seconds(grad, (args,), flags.iters))
        rows.append(row)
        print(f"{shape:16s} {inner:12s} chunk {chunk:4d}  fwd {row['fwd_ms']:8.1f} ms  "
              f"fwd+bwd {row['fwd_bwd_ms']:8.1f} ms", flush=True)
  xla._linear_scan, xla.CHUNK = inner_scans["associative"], chunk0
  out = os.path.join(os.path.dirname(__file__), "results", f"scan-xla-variants-{device}.json")
  with open(out, "w") as f:
    json.dump(dict(device=device, jax=jax.__version__, results=rows), f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
