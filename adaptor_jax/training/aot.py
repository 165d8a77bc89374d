"""Ahead-of-time compiles of the real train step for TPU slices, on a machine without a TPU.

With libtpu installed (the `tpu-aot` extra), `jax.experimental.topologies` gives the devices of
any TPU slice on a CPU host, and `jit(...).lower(...).compile()` on them runs the real XLA:TPU
compiler, Mosaic kernels included. The compiled program's memory analysis says whether a config
fits a chip's HBM, and its cost analysis counts FLOPs and bytes: a pod config is checked before
it is rented (benchmarks/tpu_fit.py).

  compiled, state = compile_train_step(config, topology_devices("v5e", (2, 2)), 32)
  report(compiled, "v5e", per_chip_batch=32)

TPU programs are compiled only; nothing here runs on a TPU, so several processes may load
libtpu at once ($ALLOW_MULTIPLE_LIBTPU_LOAD, set by kernels/deviceless.py unless the caller set
it).
"""
import math

import jax
import jax.numpy as jnp
import ml_collections

from adaptor_jax.training import config as config_lib, optimizer, sharding, steps, tasks
# The chips, their slices' devices and what a compiled program reports live with the kernels,
# whose tests compile them too; they are part of this module's API.
from kernels.deviceless import (CHIPS, Chip, cost, custom_calls, memory,  # noqa: F401
                                topology_devices)


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
