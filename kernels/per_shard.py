"""The one rule for kernels on a mesh: every kernel call runs once per shard of the batch.

Neither Mosaic nor Triton calls can be split by XLA's partitioner (Mosaic refuses; a Triton call
would have its operands gathered and every device would compute the whole batch). So under a
mesh each op wraps its backend call in `jax.shard_map`:

  the mesh     is the context's abstract mesh (`jax.sharding.get_abstract_mesh()`): the one set
               by `jax.set_mesh(mesh)` / `jax.sharding.use_mesh(mesh)` around a jitted call, or
               by `jax.sharding.use_abstract_mesh` inside one (adaptor_jax's train and eval
               steps do this);
  the batch    (axis 0 of the batched arguments and of every output) is split over every axis
               of that mesh that is not already manual and has more than one device; the other
               arguments (A, D, biases) are whole on every device (on Explicit axes the
               arguments are resharded so first, and the outputs back to the batch sharding
               of the first batched argument). Inside the region those axes
               are manual, so nothing of the call is left to the partitioner; gradients of the
               whole arguments are summed over the shards by shard_map's transpose.

Without a mesh in context, on a mesh of one device, or inside a shard_map that already made
every axis manual, the call is made as it is. A batch that the mesh's axes do not divide is a
ValueError naming both.
"""
import math

import jax
from jax.sharding import AxisType, PartitionSpec as P


def batch_axes():
  """(context abstract mesh, its axes that are not manual yet, those of them that the batch is
  split over: the ones with more than one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return mesh, (), ()
  free = tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Manual)
  return mesh, free, tuple(n for n in free if mesh.shape[n] > 1)


def per_shard(fn, args, batched, name="kernel"):
  """fn(*args) with the batch split over the context mesh (see the module docstring).

  args: a sequence of arrays or None (None is passed through as it is); batched: one bool per
  argument, True where axis 0 is the batch. Every output of fn must have the batch as axis 0.
  name: the op, for the error message.
  """
  mesh, free, axes = batch_axes()
  if not axes:
    return fn(*args)
  shards = math.prod(mesh.shape[a] for a in axes)
  sizes = {a.shape[0] for a, b in zip(args, batched) if b and a is not None}
  for size in sizes:
    if size % shards:
      raise ValueError(
          f"{name}: batch {size} does not split over the mesh axes {axes} "
          f"({' x '.join(str(mesh.shape[a]) for a in axes)} = {shards} devices); "
          "make the batch a multiple of the number of devices")
  present = [i for i, a in enumerate(args) if a is not None]
  spec = P(axes)

  def body(*arrays):
    full = list(args)
    for i, a in zip(present, arrays):
      full[i] = a
    return fn(*full)

  specs = tuple(spec if batched[i] else P() for i in present)
  arrays = [args[i] for i in present]
  explicit = any(t == AxisType.Explicit
                 for n, t in zip(mesh.axis_names, mesh.axis_types) if n in free)
  if explicit:  # shardings are part of the types: split the batch, and give it back as it was
    given = jax.typeof(next(a for a, b in zip(args, batched) if b and a is not None))
    batch_spec = given.sharding.spec[0] if given.sharding.spec else None
    arrays = [jax.sharding.reshard(a, s) for a, s in zip(arrays, specs)]
  run = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=spec, axis_names=set(free),
                      check_vma=False)
  outs = run(*arrays)
  if explicit:
    outs = jax.tree.map(lambda o: jax.sharding.reshard(o, P(batch_spec)), outs)
  return outs
