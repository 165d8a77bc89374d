"""Ahead-of-time compiles of the real train step for TPU slices, on a machine without a TPU.

With libtpu installed (the `tpu-aot` extra), `jax.experimental.topologies` gives the devices of
any TPU slice on a CPU host, and `jit(...).lower(...).compile()` on them runs the real XLA:TPU
compiler, Mosaic kernels included. The compiled program's memory analysis says whether a config
fits a chip's HBM, and its cost analysis counts FLOPs and bytes: a pod config is checked before
it is rented (benchmarks/tpu_fit.py).

  compiled, state = compile_train_step(config, topology_devices("v5e", (2, 2)), 32)
  report(compiled, "v5e", per_chip_batch=32)

TPU programs are compiled only; nothing here runs on a TPU, so several processes may load
libtpu at once ($ALLOW_MULTIPLE_LIBTPU_LOAD, set here unless the caller set it).
"""
import dataclasses
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import ml_collections

from adaptor_jax.training import config as config_lib, optimizer, sharding, steps, tasks


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU chip's published figures (Google Cloud's system architecture pages)."""
  name: str
  hbm_gib: float        # HBM per chip
  bf16_tflops: float    # peak dense bf16 FLOP/s, in 1e12
  hbm_gbps: float       # HBM bandwidth, in 1e9 bytes/s
  chip_config: str      # libtpu's chip configuration: "megacore" joins a chip's two TensorCores
  torus_dims: int       # 2 (v5e's 2-D torus) or 3

  def topology(self, shape):
    """libtpu's topology name of a slice of this chip, e.g. (2, 2) -> "v5e:2x2"."""
    return f"{self.name}:{'x'.join(map(str, shape))}"

  def slice_shape(self, chips):
    """The slice shape of `chips` chips (1, 4, 8, 16...): (2, 2) or (2, 2, 1) for 4."""
    shape = [1] * self.torus_dims
    i = 0
    while chips > 1:
      if chips % 2:
        raise ValueError(f"{self.name}: slices have a power-of-two number of chips, "
                         f"got {chips}")
      shape[i % self.torus_dims] *= 2
      chips //= 2
      i += 1
    return tuple(shape)


CHIPS = {
    "v5e": Chip("v5e", 16, 197, 819, "default", 2),
    "v4": Chip("v4", 32, 275, 1228, "megacore", 3),
    "v5p": Chip("v5p", 95, 459, 2765, "megacore", 3),
}


def topology_devices(chip, shape):
  """The devices of a `shape` slice of `chip` ("v5e", "v4", "v5p"), e.g. shape (2, 2), (1, 1,
  1) or CHIPS[chip].slice_shape(n), one device per chip. Raises ValueError when libtpu is
  missing or does not know the topology."""
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError("compiling for TPU needs libtpu: pip install -c constraints.txt -e "
                     "'.[tpu-aot]'")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: this is not a TPU VM
  # Compile-only processes never own a TPU: let several of them load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # noqa: PLC0415 - needs libtpu only when called
  spec = CHIPS[chip]
  chips = 1
  for n in shape:
    chips *= n
  kwargs = dict(chip_config_name=spec.chip_config)
  if chips < 4:  # libtpu's default host holds 2x2x1 chips; smaller slices are one small host
    kwargs["chips_per_host_bounds"] = tuple(shape) + (1,) * (3 - len(shape))
  try:
    topo = topologies.get_topology_desc(topology_name=spec.topology(shape), platform="tpu",
                                        **kwargs)
  except (RuntimeError, ValueError) as e:  # jax's JaxRuntimeError is a RuntimeError
    raise ValueError(f"TPU topology {spec.topology(shape)} ({kwargs}): {e}") from e
  return topo.devices


def abstract_batch(config, global_batch, mesh):
  """The train step's batch (config.task's) as ShapeDtypeStructs split over the mesh's batch
  axes."""
  sh = sharding.batch_sharding(mesh)
  spec = tasks.get(config.task).train_batch_spec(global_batch, config.data.image_size)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh) for k, (shape, dtype) in spec.items()}


def compile_train_step(config, devices, per_chip_batch, steps_per_epoch=1000):
  """The real train step (steps.make_train_step, as the training loop builds it) of `config`,
  compiled for `devices` (a list, e.g. topology_devices(...)) with config.mesh over them and
  `per_chip_batch` images per device. config.num_classes must be set (no dataset is read).
  Returns (compiled, the train state as ShapeDtypeStructs with their shardings)."""
  config, mesh, net, tx, state, shardings = _setup(config, devices, per_chip_batch,
                                                   steps_per_epoch)
  train_step = steps.make_train_step(net, tx, config, config.num_classes, shardings, mesh)
  compiled = train_step.lower(state, abstract_batch(config, config.batch_size, mesh)).compile()
  return compiled, state


def compile_eval_step(config, devices, per_chip_batch):
  """The eval step (steps.make_eval_step) compiled like compile_train_step. Returns compiled."""
  config, mesh, net, _, state, shardings = _setup(config, devices, per_chip_batch, 1)
  eval_step = steps.make_eval_step(net, config, shardings["params"], mesh)
  batch = abstract_batch(config, config.batch_size, mesh)
  batch["mask"] = jax.ShapeDtypeStruct(batch["label"].shape, jnp.bool_,
                                       sharding=batch["label"].sharding)
  return eval_step.lower(dict(params=state["params"], stats=state["stats"]), batch).compile()


def _setup(config, devices, per_chip_batch, steps_per_epoch):
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = per_chip_batch * len(devices)
  config_lib.validate(config)
  if config.num_classes < 1:
    raise ValueError("config.num_classes: set it for an ahead-of-time compile (no dataset "
                     "is read)")
  mesh = sharding.make_mesh(config.mesh, devices)
  made = steps.make_net(config, config.num_classes)
  tx = optimizer.make(config, steps_per_epoch, trainable=made[2])
  net, state, shardings = steps.abstract_state(config, config.num_classes, mesh, tx, made)
  return config, mesh, net, tx, state, shardings


def state_bytes(state):
  """(bytes of the whole train state, bytes of it on one device) from its shardings."""
  leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "sharding")]
  whole = sum(x.size * x.dtype.itemsize for x in leaves)
  per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)
  return whole, per_device


def memory(compiled):
  """Bytes per device of a compiled program: arguments, outputs, temporaries, aliases, and the
  total HBM it needs (arguments + temporaries + outputs - aliases)."""
  m = compiled.memory_analysis()
  out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
             temporaries=m.temp_size_in_bytes, aliases=m.alias_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  out["hbm"] = out["arguments"] + out["temporaries"] + out["outputs"] - out["aliases"]
  return out


def cost(compiled):
  """FLOPs and bytes accessed per device of a compiled program (XLA's cost analysis)."""
  c = compiled.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  return dict(flops=float(c.get("flops", 0.0)), bytes=float(c.get("bytes accessed", 0.0)))


def report(compiled, chip, per_chip_batch):
  """One row of the fit table: HBM per chip against the chip's capacity, FLOPs and bytes per
  image, and the roofline bound on training images/s per chip."""
  spec = CHIPS[chip]
  mem, c = memory(compiled), cost(compiled)
  flops, nbytes = c["flops"] / per_chip_batch, c["bytes"] / per_chip_batch
  bound = 1.0 / max(flops / (spec.bf16_tflops * 1e12), nbytes / (spec.hbm_gbps * 1e9))
  return dict(hbm_gib=mem["hbm"] / 2**30, hbm_capacity_gib=spec.hbm_gib,
              fits=mem["hbm"] <= spec.hbm_gib * 2**30,
              temporaries_gib=mem["temporaries"] / 2**30,
              arguments_gib=mem["arguments"] / 2**30,
              gflops_per_image=flops / 1e9, gbytes_per_image=nbytes / 1e9,
              roofline_images_per_s=bound,
              bound_by="flops" if flops / spec.bf16_tflops / 1e12 >= nbytes / spec.hbm_gbps / 1e9
              else "memory")


def custom_calls(compiled, name):
  """The lines of the compiled (optimized) HLO that call the kernel `name` (e.g.
  "selective_scan_fwd"), with their operand shapes: per-shard shapes mean per-shard calls."""
  return [line.strip() for line in compiled.as_text().splitlines()
          if "custom-call" in line and name in line]
