"""Times `kernels.memory_read` as Adaptor-T calls it, forward and forward+backward, per backend.

  python benchmarks/read.py [--batch=2] [--iters=15] [--backends=xla,cpu] [--out=PATH]

Shapes: the booster's (adaptor_vmamba_tiny's) four stages, 4 routes x 4 groups = 16 heads of
D / 4 channels, K = 4 points, with gamma and the scan's C as scale; the locations as Adaptor-T
makes them (backward- and forward-looking windows of L / 2^(3 - s), clipped), fp32. Reports the
median of --iters calls after warm-up, per stage and summed over the model's layers (depths
2, 2, 8, 2). Writes benchmarks/results/read-<platform>.json (or --out).
"""
import argparse
import os

import jax
import jax.numpy as jnp

import kernels
import results_file
from scan import median_seconds

STAGES = {  # name: (L, channels per head, layers)
    "stage1_56x56": (3136, 24, 2), "stage2_28x28": (784, 48, 2),
    "stage3_14x14": (196, 96, 8), "stage4_7x7": (49, 192, 2)}
HEADS, POINTS = 16, 4
PLATFORM_BACKENDS = {"cpu": ["xla", "cpu"], "gpu": ["xla"], "tpu": ["xla", "pallas_tpu"]}


def make_args(batch, length, channels):
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  h = jax.random.normal(ks[0], (batch, length, HEADS, channels))
  group = jnp.arange(HEADS) % 4
  reach = jnp.where(jnp.arange(HEADS) < 8, -1.0, 1.0) * length / 2.0 ** (3 - group)
  move = jax.nn.sigmoid(jax.random.normal(ks[1], (batch, POINTS, HEADS, length)))
  pos = jnp.clip(jnp.arange(length, dtype=jnp.float32) + reach[:, None] * move, 0, length - 1)
  weight = jax.nn.softmax(jax.random.normal(ks[2], (batch, POINTS, HEADS, length)), axis=1)
  return (h, pos, weight, jax.random.normal(ks[3], (HEADS, channels)),
          jax.random.normal(ks[4], (batch, HEADS, length)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--iters", type=int, default=15)
  parser.add_argument("--backends", default=None, help="comma-separated; default: the device's")
  parser.add_argument("--out", default=None, help="default benchmarks/results/read-<platform>.json")
  args = parser.parse_args()
  platform = jax.default_backend()
  backends = args.backends.split(",") if args.backends else PLATFORM_BACKENDS[platform]
  path = args.out or os.path.join(results_file.RESULTS, f"read-{platform}.json")
  results = results_file.load(path)
  totals = {}
  for stage, (length, channels, layers) in STAGES.items():
    op_args = make_args(args.batch, length, channels)
    for backend in backends:
      op = lambda *a, backend=backend: kernels.memory_read(*a, backend=backend)
      loss = lambda *a, op=op: jnp.sum(op(*a) ** 2)
      fwd = median_seconds(jax.jit(op), op_args, args.iters)
      both = median_seconds(jax.jit(jax.grad(loss, argnums=range(5))), op_args, args.iters)
      row = dict(stage=stage, backend=backend, batch=args.batch, length=length,
                 channels=channels, fwd_ms=round(fwd * 1e3, 3), fwd_bwd_ms=round(both * 1e3, 3))
      results["rows"][f"{stage}/{backend}/b{args.batch}"] = row
      total = totals.setdefault(backend, [0.0, 0.0])
      total[0] += layers * fwd
      total[1] += layers * both
      print(f"{stage:14s} {backend:10s} fwd {row['fwd_ms']:8.2f} ms  fwd+bwd "
            f"{row['fwd_bwd_ms']:8.2f} ms", flush=True)
  for backend, (fwd, both) in totals.items():
    results["rows"][f"model/{backend}/b{args.batch}"] = dict(
        stage="model", backend=backend, batch=args.batch, fwd_ms=round(fwd * 1e3, 2),
        fwd_bwd_ms=round(both * 1e3, 2))
    print(f"{'all 14 layers':14s} {backend:10s} fwd {fwd * 1e3:8.2f} ms  fwd+bwd "
          f"{both * 1e3:8.2f} ms")
  results_file.save(path, results, device=str(jax.devices()[0]), jax=jax.__version__,
                    iters=args.iters)
  print(f"results in {path}")


if __name__ == "__main__":
  main()
