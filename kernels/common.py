"""What the kernels' modules share: the float32 they compute in, and the read's taps (the two rows
and the fraction of a location), so that the read's backends import this and not each other."""
import jax.numpy as jnp

F32 = jnp.float32


def taps(pos, length):
  """(p0, p1, f) of every location: the two rows read (int32, clamped to [0, L-1]) and the
  fraction of the second one."""
  floor = jnp.floor(pos)
  p0 = jnp.clip(floor, 0, length - 1).astype(jnp.int32)
  return p0, jnp.minimum(p0 + 1, length - 1), pos - floor
