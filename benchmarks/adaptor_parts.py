"""Parts of Adaptor-T replaced by nothing, to take its cost apart (adaptor_block.py,
adaptor_cost.py): a model or block traced and compiled inside `replaced(parts)` has
  read  the read op (kernels.memory_read, every backend) returning h + 0 x a sum of its other
        inputs: its output and nothing else; learned_read then takes phi's product and the
        locations in XLA (its xla path) on every platform;
  phi   that product of XLA's (kernels.learned.route_linear) with a zero backward.
What such a program costs, against the whole adaptor and against no adaptor, bounds what a
faster read or phi backward could save. The numbers are not a model's: its gradients are wrong.
"""
import contextlib

import jax
import jax.numpy as jnp

from kernels import learned, read

PARTS = ("read", "phi")


def _no_read(h, pos, weight, gamma=None, scale=None):
  others = [x for x in (pos, weight, gamma, scale) if x is not None]
  return h + (0.0 * sum(jnp.sum(x) for x in others)).astype(h.dtype)


_route_linear = learned.route_linear


@jax.custom_vjp
def _phi_no_backward(x_BLE, w_RDC):
  return _route_linear(x_BLE, w_RDC)


_phi_no_backward.defvjp(lambda x, w: (_phi_no_backward(x, w), (x, w)),
                        lambda res, g: tuple(jnp.zeros_like(a) for a in res))


@contextlib.contextmanager
def replaced(parts):
  """The parts of Adaptor-T named in `parts` (a sequence of PARTS) replaced by nothing, and
  jax's caches cleared on the way in and out (jitted ops are traced once per shape)."""
  saved, saved_learned = dict(read.BACKENDS), dict(learned.BACKENDS)
  try:
    if "read" in parts:
      read.BACKENDS.update(pallas_tpu=_no_read, xla=_no_read, cpu=_no_read)
      learned.BACKENDS.update(pallas_tpu=learned.xla)
    if "phi" in parts:
      learned.route_linear = _phi_no_backward
    jax.clear_caches()  # jitted ops (common.memory_read) were traced with the parts in place
    yield
  finally:
    read.BACKENDS.update(saved)
    learned.BACKENDS.update(saved_learned)
    learned.route_linear = _route_linear
    jax.clear_caches()
