"""Cases for tests/test_per_shard.py that need several devices, run in their own process
(XLA_FLAGS must be set before jax is imported):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/per_shard_cases.py OUT.json

On 4 fake CPU devices it writes OUT.json with, for meshes (data 4) and (data 2, fsdp 2):
  * the scan's y, last state and every gradient under the mesh (Auto axes, and Explicit ones for
    (2, 2)) against the same call without one, for the xla backend and the Pallas TPU kernels in
    interpret mode;
  * where the kernel calls of jit(grad) sit in its jaxpr (inside a shard_map or not);
  * the error for a batch the mesh does not divide;
  * a user's own jitted model under `jax.set_mesh`: logits against no mesh, kernel placement;
  * the Triton and Mosaic custom calls of the real sharded train step (steps.make_train_step of
    a tiny preset, scan_backend="auto") exported for CUDA and for TPU: how many lie inside a
    manual (shard_map) region, how many outside, and their batch sizes.
"""
import functools
import json
import sys

TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "tpu_custom_call"


def kernel_calls(module_text, targets):
  """{target: {"manual": n, "outside": n}}: where the custom calls to `targets` sit in a
  StableHLO module, following calls between functions: a call is inside a manual region when
  every path from @main to it passes through an sdy.manual_computation."""
  from jax._src.interpreters import mlir  # noqa: PLC0415
  from jax._src.lib.mlir import ir  # noqa: PLC0415

  with mlir.make_ir_context():
    module = ir.Module.parse(module_text)
    funcs = {ir.StringAttr(op.attributes["sym_name"]).value: op
             for op in module.body.operations if op.operation.name == "func.func"}

    def walk(op, manual, out):
      for region in op.regions:
        for block in region.blocks:
          for inner in block.operations:
            name = inner.operation.name
            if name in ("func.call", "call"):
              out.append(("call", ir.FlatSymbolRefAttr(inner.attributes["callee"]).value, manual))
            elif name == "stablehlo.custom_call":
              target = ir.StringAttr(inner.attributes["call_target_name"]).value
              out.append(("custom", target, manual))
            walk(inner, manual or name == "sdy.manual_computation", out)

    events = {}
    for name, func in funcs.items():
      events[name] = []
      walk(func, False, events[name])
  contexts = {name: set() for name in funcs}  # the manual flags each function is reached with
  contexts["main"] = {False}
  changed = True
  while changed:
    changed = False
    for name, evs in events.items():
      for kind, callee, manual in evs:
        if kind == "call":
          new = {m or manual for m in contexts[name]} - contexts[callee]
          if new:
            contexts[callee] |= new
            changed = True
  out = {t: {"manual": 0, "outside": 0} for t in targets}
  for name, evs in events.items():
    for kind, target, manual in evs:
      if kind == "custom" and target in out:
        for m in contexts[name]:
          out[target]["manual" if (m or manual) else "outside"] += 1
  return out


def pallas_calls(jaxpr, inside=False, out=None):
  """{"manual": n, "outside": n}: pallas_call equations of a jaxpr inside a shard_map or not."""
  import jax.extend  # noqa: PLC0415
  out = {"manual": 0, "outside": 0} if out is None else out
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      out["manual" if inside else "outside"] += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      pallas_calls(sub, inside or eqn.primitive.name == "shard_map", out)
  return out


def scan_under_meshes(result):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

  import kernels  # noqa: PLC0415
  from kernels import pallas_tpu  # noqa: PLC0415
  from scan_cases import make_inputs, rel_err, value_and_grads  # noqa: PLC0415

  backends = {"xla": "xla", "pallas_tpu_interpret": functools.partial(
      pallas_tpu.selective_scan, interpret=pltpu.InterpretParams(),
      block_sizes=pallas_tpu.BlockSizes(block_l=8))}
  inputs = make_inputs(5, batch=8, length=24, d_inner=16, n_state=1, groups=2)
  flags = dict(delta_softplus=True, reverse=True)
  types = jax.sharding.AxisType
  for mesh_shape, axis_type in (((4, 1), types.Auto), ((2, 2), types.Auto),
                                ((2, 2), types.Explicit)):
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp"), axis_types=(axis_type,) * 2)
    for name, backend in backends.items():
      fn = functools.partial(kernels.selective_scan, backend=backend)
      want = value_and_grads(fn, inputs, **flags)
      with jax.set_mesh(mesh):
        got = value_and_grads(fn, inputs, **flags)
        jaxpr = jax.make_jaxpr(jax.grad(
            lambda u: jnp.sum(fn(**{**inputs, "u": u}, **flags))))(inputs["u"]).jaxpr
      errs = {"y": rel_err(got[0], want[0]), "last": rel_err(got[1], want[1])}
      errs.update({f"d{k}": rel_err(got[2][k], want[2][k]) for k in want[2]})
      key = f"{name}/{mesh_shape[0]}x{mesh_shape[1]}/{axis_type.name}"
      result["errors"][key] = errs
      if name != "xla":
        result["jaxpr"][key] = pallas_calls(jaxpr)
  with jax.set_mesh(mesh):
    odd = make_inputs(6, batch=6, length=8, d_inner=8)
    try:
      kernels.selective_scan(**odd, backend="xla")
      result["odd_batch_error"] = None
    except ValueError as e:
      result["odd_batch_error"] = str(e)


def users_jit(result):
  """A user's own jitted forward of a small model under `with jax.set_mesh(mesh)` (a Mesh of
  Auto axes, as jax.sharding.Mesh makes), images split over the mesh: the logits equal those
  without a mesh, and exported for TPU every Mosaic call is in a manual region."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

  import adaptor_jax  # noqa: PLC0415
  from scan_cases import rel_err  # noqa: PLC0415

  model = adaptor_jax.create_model("mamba_adaptor_b1", num_classes=10, dims=(8, 16),
                                   depths=(1, 1), rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  images = np.random.default_rng(0).standard_normal((8, 16, 16, 3)).astype(np.float32)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  want = forward(state, images)
  mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  with jax.set_mesh(mesh):
    x = jax.device_put(images, NamedSharding(mesh, P("data")))
    got = forward(state, x)
    text = jax.export.export(forward, platforms=["tpu"])(state, x).mlir_module()
  result["users_jit"] = dict(rel_err=rel_err(got, want), **kernel_calls(text, [MOSAIC])[MOSAIC])


def exported_train_step(result):
  import jax  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415

  from adaptor_jax.training import aot, optimizer, sharding, steps  # noqa: PLC0415
  import train_cases  # noqa: PLC0415

  for mesh_shape in ((4, 1), (2, 2)):
    config = train_cases.tiny_config()
    config.scan_backend = "auto"
    config.num_classes = 10
    config.mesh = ml_collections.ConfigDict(dict(data=mesh_shape[0], fsdp=mesh_shape[1]))
    mesh = sharding.make_mesh(config.mesh, jax.devices())
    made = steps.make_net(config, 10)
    tx = optimizer.make(config, 10, trainable=made[2])
    net, state, shardings = steps.abstract_state(config, 10, mesh, tx, made)
    step = steps.make_train_step(net, tx, config, 10, shardings, mesh)
    batch = aot.abstract_batch(config, 16, mesh)
    for platform, target in (("cuda", TRITON), ("tpu", MOSAIC)):
      checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
      exported = jax.export.export(step, platforms=[platform], disabled_checks=checks)(
          state, batch)
      text = exported.mlir_module()
      result["export"][f"{platform}/{mesh_shape[0]}x{mesh_shape[1]}"] = dict(
          kernel_calls(text, [target])[target], nr_devices=exported.nr_devices)


def main(out_path):
  import jax  # noqa: PLC0415
  assert jax.device_count() == 4, jax.devices()
  result = {"errors": {}, "jaxpr": {}, "export": {}}
  scan_under_meshes(result)
  users_jit(result)
  exported_train_step(result)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
