"""What the adaptor costs in one VSS block: a block's forward and backward alone, compiled
deviceless for one TPU chip, with and without each adaptor.

  python benchmarks/adaptor_block.py [--widths=96,192,384] [--variants=none,t,s,ts]
      [--ssm_ratio=2.0] [--tpu_chip=v5e] [--batch=32] [--dtype=bfloat16] [--out=PATH] [--redo]

A variant names the adaptors the block carries: none, t (Adaptor-T), s (Adaptor-S), ts (both,
as in b2); after a "/", parts of Adaptor-T replaced by nothing, to take its bytes apart:
"t/read" (the read op returns h + 0 x a sum of its other inputs: nothing but its output),
"t/read+phi" (and phi's product has a zero backward). A width w runs at the feature map of a 224x224 image at that stage (56 x 96 / w
pixels a side: 56x56 at 96, 28x28 at 192, 14x14 at 384), with b2's block settings (d_state 1,
MLP ratio 4, --ssm_ratio; the booster's VMamba-T blocks have ssm_ratio 1). The program is
jit(grad(sum(block(x)^2))) over the block's params and x. Per row: bytes accessed, FLOPs and
temporaries per image from XLA's cost and memory analyses, and each adapted variant's bytes over
none's. adaptor_cost.py gives the same for whole train steps; this one says where in the network
the adaptor's bytes are. Writes benchmarks/results/adaptor-block.json (rows merged by key).
"""
import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

import results_file
from adaptor_parts import PARTS, replaced
from adaptor_jax.models.adaptor import AdaptorConfig, AdaptorS, AdaptorT
from adaptor_jax.models.vmamba import VSSBlock
from adaptor_jax.training import aot, config as config_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("widths", ["96", "192", "384"], "block widths (b2's stages 1-3)")
flags.DEFINE_list("variants", ["none", "t", "s", "ts"], "adaptors the block carries")
flags.DEFINE_float("ssm_ratio", 2.0, "SS2D's inner width / block width")
flags.DEFINE_enum("tpu_chip", "v5e", sorted(aot.CHIPS), "TPU chip of the deviceless compile")
flags.DEFINE_integer("batch", 32, "per-chip batch")
flags.DEFINE_enum("dtype", "bfloat16", config_lib.DTYPES, "compute dtype")
flags.DEFINE_string("out", os.path.join(results_file.RESULTS, "adaptor-block.json"),
                    "results file (rows merged in)")
flags.DEFINE_bool("redo", False, "measure rows the results file already has")


def _known(variant):
  adaptors, _, parts = variant.partition("/")
  parts = set(parts.split("+") if parts else [])
  return adaptors in ("none", "t", "s", "ts") and parts <= set(PARTS)


flags.register_validator("variants", lambda vs: all(map(_known, vs)),
                         "each variant is none, t, s or ts, then optionally /read, /phi or "
                         "/read+phi (parts of Adaptor-T replaced by nothing)")


def make_block(width, variant, dtype):
  d_inner, cfg, rngs = int(FLAGS.ssm_ratio * width), AdaptorConfig(), nnx.Rngs(0)
  adaptor_t = (AdaptorT(d_inner, cfg, gamma_init=1.0, dtype=dtype, rngs=rngs)
               if "t" in variant else None)
  adaptor_s = (AdaptorS(d_inner, cfg, zero_init=False, dtype=dtype, rngs=rngs)
               if "s" in variant else None)
  return VSSBlock(width, drop_path=0.0, ssm_ratio=FLAGS.ssm_ratio, d_state=1, mlp_ratio=4.0,
                  adaptor_t=adaptor_t, adaptor_s=adaptor_s, dtype=dtype, scan_backend="auto",
                  rngs=rngs)


def measure(width, variant, device):
  dtype = jnp.dtype(FLAGS.dtype)
  adaptors, _, parts = variant.partition("/")
  graph, params, rest = nnx.split(make_block(width, adaptors, dtype), nnx.Param, ...)

  def loss(params, x):
    return jnp.sum(nnx.merge(graph, params, rest)(x).astype(jnp.float32) ** 2)

  on_chip = jax.sharding.SingleDeviceSharding(device)
  spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_chip)
  side = 56 * 96 // width
  x = jax.ShapeDtypeStruct((FLAGS.batch, side, side, width), dtype, sharding=on_chip)
  start = time.perf_counter()
  with replaced(parts.split("+") if parts else []):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        jax.tree.map(spec, params), x).compile()
  mem, cost, b = aot.memory(compiled), aot.cost(compiled), FLAGS.batch
  return dict(width=width, side=side, variant=variant, chip=FLAGS.tpu_chip, batch=b,
              dtype=FLAGS.dtype, ssm_ratio=FLAGS.ssm_ratio,
              compile_s=round(time.perf_counter() - start, 1),
              gbytes_per_image=cost["bytes"] / b / 1e9, gflops_per_image=cost["flops"] / b / 1e9,
              temporaries_mb_per_image=mem["temporaries"] / b / 1e6)


def main(argv):
  del argv
  results = results_file.load(FLAGS.out)
  rows = results["rows"]
  device = aot.topology_devices(FLAGS.tpu_chip, aot.CHIPS[FLAGS.tpu_chip].slice_shape(1))[0]
  key = lambda w, v: f"{FLAGS.tpu_chip}/w{w}/r{FLAGS.ssm_ratio:g}/{v}/b{FLAGS.batch}/{FLAGS.dtype}"
  for width in map(int, FLAGS.widths):
    for variant in FLAGS.variants:
      if FLAGS.redo or key(width, variant) not in rows:
        rows[key(width, variant)] = measure(width, variant, device)
        results_file.save(FLAGS.out, results, jax=jax.__version__)
      row, base = rows[key(width, variant)], rows.get(key(width, "none"))
      vs = f"{row['gbytes_per_image'] / base['gbytes_per_image']:5.2f}x" if base else ""
      print(f"width {width:4d} {variant:10s} GB/img {row['gbytes_per_image']:.4f}  GFLOPs/img "
            f"{row['gflops_per_image']:.3f}  temporaries MB/img "
            f"{row['temporaries_mb_per_image']:.1f}  {vs}", flush=True)
  print("results in", FLAGS.out)


if __name__ == "__main__":
  app.run(main)
