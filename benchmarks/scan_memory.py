"""XLA's compiled memory analysis of selective-scan forward+backward, per backend.

  python benchmarks/scan_memory.py

For each backend that compiles on this device, batch 2, D 64, fp32, L in 1024..8192 and N in
{1, 16}: the temporary bytes of jit(grad(sum of the scan)) divided by batch*L*D*4 bytes (one
fp32 activation). A backend that materialised the (batch, L, D, N) states would show a ratio
of N or more that grows with N; an O(batch*L*D) one stays flat in L and N.
Writes benchmarks/results/scan-memory-<device>.json.
"""
import json
import os

import jax
import jax.numpy as jnp

import kernels
from scan import PLATFORM_BACKENDS, make_args


def temp_ratio(backend, length, n_state, batch=2, d_inner=64):
  args = make_args(batch, length, d_inner, 1, n_state, jnp.float32)
  scan = lambda a: kernels.selective_scan(**a, delta_softplus=True, backend=backend)
  grad = jax.jit(jax.grad(lambda a: jnp.sum(scan(a))))
  analysis = grad.lower(args).compile().memory_analysis()
  return analysis.temp_size_in_bytes / (batch * length * d_inner * 4)


def main():
  platform = jax.default_backend()
  device = jax.devices()[0].device_kind.replace(" ", "_").lower()
  rows = []
  for backend in PLATFORM_BACKENDS[platform]:
    for n_state in (1, 16):
      for length in (1024, 2048, 4096, 8192):
        ratio = temp_ratio(backend, length, n_state)
        rows.append(dict(backend=backend, N=n_state, L=length, temp_over_BLD4=ratio))
        print(f"{backend:10s} N={n_state:2d} L={length:5d}  temp / (batch*L*D*4) = {ratio:6.2f}",
              flush=True)
  out = os.path.join(os.path.dirname(__file__), "results", f"scan-memory-{device}.json")
  with open(out, "w") as f:
    json.dump(dict(device=device, jax=jax.__version__, batch=2, D=64, dtype="float32",
                   results=rows), f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
