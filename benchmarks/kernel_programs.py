"""The Mosaic kernels' programs, to tell whether a change to kernels/ changed what they compile to.

  python benchmarks/kernel_programs.py [--out=PATH] [--compare=OTHER.json]

Lowers and compiles, deviceless for one v5e chip (libtpu on this host), the forward and the
forward + backward of the TPU kernels at a few cases: the selective scan (N = 1 and 16, groups,
z, reverse, bf16 and fp32, a ragged chunk) and memory_read / learned_read (gamma and scale or
neither, bf16 and fp32, a ragged chunk). Per case and direction it records a hash of each
kernel's Mosaic module printed without debug locations (source files and lines do not count,
names of Python variables never reach it) together with the cost the kernel states to XLA, and
XLA's cost and memory analyses of the whole program. --compare names every case that differs
from another run's file (say, this script run on an earlier checkout with PYTHONPATH set to it)
and exits 1 if any does. The hashes hold for one jax and libtpu (both recorded).
Writes benchmarks/results/kernel-programs.json by default.
"""
import argparse
import base64
import hashlib
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.interpreters import mlir as jax_mlir  # noqa: E402 - parses the Mosaic bytecode
from jax._src.lib import tpu as tpu_dialect  # noqa: E402
from jax._src.lib.mlir import ir  # noqa: E402

from kernels import deviceless, pallas_tpu, read_pallas_tpu  # noqa: E402

BF16, F32 = jnp.bfloat16, jnp.float32
# name: (op, shape arguments, dtype, options)
CASES = {
    "scan_n1_bf16_z": ("scan", (2, 3136, 384, 1, 1), BF16, dict(z=True, reverse=False)),
    "scan_n1_fp32_reverse_ragged": ("scan", (2, 1000, 192, 1, 1), F32,
                                    dict(z=False, reverse=True)),
    "scan_n16_g4_bf16_z_reverse": ("scan", (2, 200, 256, 4, 16), BF16,
                                   dict(z=True, reverse=True)),
    "read_bf16_gamma_scale": ("read", (2, 3136, 16, 12, 4), BF16, dict(gamma=True, scale=True)),
    "read_fp32_ragged": ("read", (2, 300, 8, 24, 2), F32, dict(gamma=False, scale=False)),
    "learned_bf16_gamma_scale": ("learned", (2, 3136, 16, 12, 4, 4), BF16,
                                 dict(gamma=True, scale=True)),
    "learned_fp32_gamma_ragged": ("learned", (2, 300, 8, 24, 2, 2), F32,
                                  dict(gamma=True, scale=False)),
}


def case_fn(op, shape, dtype, opts, sds):
  """(loss of the kernel's output, its argument shapes)."""
  sq = lambda x: jnp.sum(x.astype(F32) ** 2)
  if op == "scan":
    batch, length, d_inner, groups, n_state = shape
    bld, blgn = sds((batch, length, d_inner), dtype), sds((batch, length, groups, n_state), dtype)
    args = (bld, bld, sds((d_inner, n_state)), blgn, blgn, sds((d_inner,)), bld, sds((d_inner,)))

    def loss(u, delta, A, B, C, D, z, bias):
      y, last = pallas_tpu.selective_scan(u, delta, A, B, C, D, z if opts["z"] else None, bias,
                                          True, True, opts["reverse"])
      return sq(y) + sq(last)
    return loss, args
  batch, length, heads, channels, points = shape[:5]
  optional = (sds((heads, channels)), sds((batch, heads, length)))
  given = lambda gamma, scale: (gamma if opts["gamma"] else None,
                                scale if opts["scale"] else None)
  h = sds((batch, length, heads, channels), dtype)
  if op == "read":
    tables = sds((batch, points, heads, length))
    return (lambda h, pos, w, gamma, scale: sq(read_pallas_tpu.read(h, pos, w,
                                                                    *given(gamma, scale))),
            (h, tables, tables, *optional))
  routes = shape[5]
  per_route = heads // routes
  args = (h, sds((routes, per_route * channels, 2 * points * per_route)),
          sds((routes, 2 * points * per_route)), sds((heads,)), *optional)
  return (lambda h, w, b, reach, gamma, scale: sq(read_pallas_tpu.learned(
      h, w, b, reach, *given(gamma, scale))), args)


def mosaic_hashes(lowered_text):
  """Per Mosaic call of a lowered program: a hash of its module printed without locations and
  of the rest of its backend config (the stated cost, the compiler's options)."""
  hashes = []
  for m in re.finditer(r'@tpu_custom_call\([^)]*\) \{backend_config = "(.*?)"(?:,| \})',
                       lowered_text):
    config = json.loads(re.sub(r"\\([0-9A-Fa-f]{2})", lambda x: chr(int(x.group(1), 16)),
                               m.group(1)))
    call = config.pop("custom_call_config")
    ctx = jax_mlir.make_ir_context()
    with ctx, ir.Location.unknown():
      ctx.allow_unregistered_dialects = True
      tpu_dialect.register_dialect(ctx)
      module = ir.Module.parse(base64.b64decode(call.pop("body")))
      text = module.operation.get_asm(enable_debug_info=False)
    rest = json.dumps([call, config], sort_keys=True)
    hashes.append(hashlib.sha256((text + rest).encode()).hexdigest()[:16])
  return hashes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(HERE, "results", "kernel-programs.json"))
  parser.add_argument("--compare", default=None, help="another run's file")
  args = parser.parse_args()
  device = deviceless.topology_devices("v5e", (1, 1))[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  sds = lambda shape, dtype=F32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  import libtpu  # noqa: PLC0415 - installed: topology_devices checked it
  rows = {}
  for name, (op, shape, dtype, opts) in CASES.items():
    start = time.perf_counter()
    loss, shapes = case_fn(op, shape, dtype, opts, sds)
    row = {}
    for direction, fn in (("fwd", loss), ("fwd+bwd", jax.grad(loss, range(len(shapes))))):
      lowered = jax.jit(fn).lower(*shapes)
      compiled = lowered.compile()
      row[direction] = dict(kernels=mosaic_hashes(lowered.as_text()),
                            cost=deviceless.cost(compiled), memory=deviceless.memory(compiled))
    rows[name] = row
    print(f"{name:30s} fwd {' '.join(row['fwd']['kernels'])}  fwd+bwd "
          f"{' '.join(row['fwd+bwd']['kernels'])}  {row['fwd+bwd']['cost']['bytes'] / 1e6:.1f} MB "
          f"[{time.perf_counter() - start:.1f} s]", flush=True)
  result = dict(jax=jax.__version__, libtpu=getattr(libtpu, "__version__", "?"), rows=rows)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  print(f"wrote {args.out}")
  if args.compare:
    with open(args.compare) as f:
      other = json.load(f)["rows"]
    differ = [n for n in rows if other.get(n) != rows[n]]
    print(f"against {args.compare}: " + (f"DIFFERENT: {', '.join(differ)}" if differ else
                                          f"all {len(rows)} cases identical"))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
  main()
