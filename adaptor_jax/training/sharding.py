"""The device mesh (axes `data`, `fsdp`) and where every array of the train state lives on it.

Batches are split over both axes. FSDP: every param (and its optimizer moments and EMA copy) is
split over `fsdp` along its first logical axis (`embed`, `mlp`, `inner`, `classes`) whose size
the `fsdp` axis divides; params with no such axis (small ones: norms, A_log of N = 1...) are
replicated. With fsdp = 1 everything is replicated and training is plain data parallel.
"""
import jax
import numpy as np
from flax import nnx
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
  try:  # topology-aware on TPU/GPU slices; a plain reshape elsewhere
    grid = jax.experimental.mesh_utils.create_device_mesh((data, fsdp), devices)
  except Exception:  # noqa: BLE001 - e.g. CPU devices without a topology
    grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, ("data", "fsdp"))


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
