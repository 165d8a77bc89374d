"""The device mesh (axes `data`, `fsdp`) and where every array of the train state lives on it.

Batches are split over both axes. FSDP: every param (and its optimizer moments and EMA copy) is
split over `fsdp` along its first logical axis (`embed`, `mlp`, `inner`, `classes`) whose size
the `fsdp` axis divides; params with no such axis (small ones: norms, A_log of N = 1...) are
replicated. With fsdp = 1 everything is replicated and training is plain data parallel.

The steps are traced with the mesh as the context's abstract mesh (`on_mesh`), so every kernel
call in the model runs once per shard of the batch (kernels/per_shard.py).
"""
import functools

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH = ("data", "fsdp")
SHARDABLE = ("embed", "mlp", "inner", "classes")


def make_mesh(mesh_config, devices=None):
  """A Mesh of shape (data, fsdp) over `devices` (default: all of them); -1 fills the rest."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  data, fsdp = mesh_config.data, mesh_config.fsdp
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"config.mesh: data={mesh_config.data} x fsdp={mesh_config.fsdp} does not "
                     f"cover the {n} devices")
  grid = device_grid((data, fsdp), devices)
  return Mesh(grid, ("data", "fsdp"))


def device_grid(shape, devices):
  """Devices laid out as an array of `shape`. On TPU, `mesh_utils.create_device_mesh`'s layout:
  it follows the chips' physical torus, so each mesh axis is a ring of neighbouring chips
  (a physical axis is split between mesh axes where the shapes ask for it, e.g. (2, 8) on 4x4).
  Elsewhere (GPU hosts, CPU) the devices in the order given, reshaped: `jax.devices()` groups
  them by process, so the last axis (fsdp, whose all-gathers are the most frequent) stays
  inside a host whenever it fits in one."""
  if devices[0].platform == "tpu":
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return np.asarray(devices).reshape(shape)


def on_mesh(fn, mesh):
  """`fn` traced with `mesh` as the context's abstract mesh: kernels inside run per shard."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def param_spec(names, shape, fsdp_size):
  """The PartitionSpec of one param with logical axis `names` (None where unannotated)."""
  names = names or (None,) * len(shape)
  spec = [None] * len(shape)
  if fsdp_size > 1:
    for i, (name, size) in enumerate(zip(names, shape)):
      if name in SHARDABLE and size % fsdp_size == 0:
        spec[i] = "fsdp"
        break
  return P(*spec)


def state_shardings(abstract_params, mesh):
  """NamedShardings for a pytree of nnx.Param (abstract or concrete), from their annotations."""
  fsdp = mesh.shape["fsdp"]

  def one(var):
    names = var.get_metadata().get("out_sharding")
    return NamedSharding(mesh, param_spec(names, var.shape, fsdp))

  return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh):
  """Leading (batch) axis split over data and fsdp."""
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh):
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh):
  """A global jax.Array from this process's slice of the batch (a dict of numpy arrays)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
