"""`memory_read`: Adaptor-T's interpolated read of earlier states (DESIGN.md §3), as an op.

  read = memory_read(h, pos, weight, backend="auto")
  h: (batch, L, G, C)         G independent heads (Adaptor-T: route x channel group), C channels
  pos, weight: (batch, L, G, K) float32: K locations per position and head, and their weights
  read[b, i, g] = sum_k weight[b, i, g, k] * lerp(h[b, :, g], pos[b, i, g, k])
  lerp(x, p) = (1 - f) x[p0] + f x[p1],  p0 = floor(p), p1 = min(p0 + 1, L - 1), f = p - p0

pos should lie in [0, L - 1] (Adaptor-T clips it); the rows read are clamped to the sequence.
`read` has h's dtype; products accumulate in float32. Gradients: dh (a scatter-add of the
weighted cotangent rows), d pos = weight (h[p1] - h[p0]) . d read, d weight = lerp . d read.

Backends, each with the same signature (h, pos, weight) -> read:
  reference   gathers the 2K = 2 x K taps (batch, L, G, 2K, C) at once and lets autodiff
              differentiate them: obviously right, and it keeps every tap for the backward;
  xla         a custom_vjp that visits one location (two taps) at a time: the forward keeps
              only its inputs, the backward gathers each tap again and scatter-adds into dh.
              Nothing of size 2K x h is ever live (the CPU and GPU default: gathers of
              contiguous rows and scatter-adds are native there);
  pallas_tpu  Mosaic kernels (read_pallas_tpu.py): XLA:TPU turns the scatter-add into a
              serial loop over updates and its row gathers move whole tiles, so on TPU the rows
              are read and accumulated inside VMEM.
"auto" picks pallas_tpu on TPU and xla elsewhere, inside one jitted function. Under a mesh the
call runs once per shard of the batch (per_shard.py).
"""
import os

import jax
import jax.numpy as jnp

from kernels.per_shard import per_shard

F32 = jnp.float32
ENV_VAR = "ADAPTOR_READ_BACKEND"  # overrides backend="auto" for every call in the process


def memory_read(h, pos, weight, backend="auto"):
  """Weighted interpolated read of K locations per position and head; see the module
  docstring. backend: "auto" ($ADAPTOR_READ_BACKEND overrides it), one of BACKENDS, or a
  function (h, pos, weight) -> read (the tests pass interpret-mode kernels this way)."""
  _check(h, pos, weight)
  pos, weight = pos.astype(F32), weight.astype(F32)
  if backend == "auto":
    backend = os.environ.get(ENV_VAR, "auto")
  if backend == "auto":
    call = lambda *a: jax.lax.platform_dependent(*a, tpu=BACKENDS["pallas_tpu"],
                                                 default=BACKENDS["xla"])
  elif backend in BACKENDS or callable(backend):
    call = BACKENDS.get(backend, backend)
  else:
    raise ValueError(f"memory_read: unknown backend {backend!r}; "
                     f"choose 'auto' or one of {sorted(BACKENDS)}")
  return per_shard(call, (h, pos, weight), batched=(True, True, True), name="memory_read")


def _check(h, pos, weight):
  """Raises ValueError naming the argument whose shape or dtype breaks the contract."""
  def fail(msg):
    raise ValueError(f"memory_read: {msg}")

  if h.ndim != 4:
    fail(f"h must be (batch, L, G, C), got shape {h.shape}")
  if h.shape[1] == 0:
    fail("h has length L = 0")
  for name, x in (("pos", pos), ("weight", weight)):
    if x.ndim != 4 or x.shape[:3] != h.shape[:3]:
      fail(f"{name} must be (batch, L, G, K) = {h.shape[:3] + ('K',)}, got {x.shape}")
  if pos.shape != weight.shape:
    fail(f"pos and weight must have the same shape, got {pos.shape} and {weight.shape}")
  for name, x in (("h", h), ("pos", pos), ("weight", weight)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      fail(f"{name} must be floating point, got {x.dtype}")


def taps(pos, length):
  """(p0, p1, f) of every location: the two rows read (int32, clamped to [0, L-1]) and the
  fraction of the second one."""
  floor = jnp.floor(pos)
  p0 = jnp.clip(floor, 0, length - 1).astype(jnp.int32)
  return p0, jnp.minimum(p0 + 1, length - 1), pos - floor


# ---------------------------------------------------------------------------------------------
# reference: every tap at once, autodiff backward.

def reference(h, pos, weight):
  length, K = h.shape[1], pos.shape[-1]
  acc = jnp.promote_types(h.dtype, F32)
  p0, p1, f = taps(pos, length)
  idx_BLGJ = jnp.concatenate([p0, p1], axis=-1)  # J = 2K taps
  w_BLGJ = jnp.concatenate([weight * (1.0 - f), weight * f], axis=-1)
  batch, _, groups, C = h.shape
  flat = idx_BLGJ.transpose(0, 3, 1, 2).reshape(batch, 2 * K * length, groups, 1)
  taps_BJLGC = jnp.take_along_axis(h.astype(acc), flat, axis=1).reshape(
      batch, 2 * K, length, groups, C)
  read = jnp.einsum("bjlgc,bjlg->blgc", taps_BJLGC, w_BLGJ.transpose(0, 3, 1, 2).astype(acc))
  return read.astype(h.dtype)


# ---------------------------------------------------------------------------------------------
# xla: one tap at a time, hand-written backward.

def _rows(h_BLGC, idx_BLG):
  """h[b, idx[b, i, g], g, :] for every (b, i, g): (batch, L, G, C)."""
  return jnp.take_along_axis(h_BLGC, idx_BLG[..., None], axis=1)


def _per_point(x_BLGK):
  """(K, batch, L, G): the points first, for a loop over them."""
  return jnp.moveaxis(x_BLGK, -1, 0)


@jax.custom_vjp
def xla(h, pos, weight):
  p0, p1, f = map(_per_point, taps(pos, h.shape[1]))

  def point(read, xs):  # one location: its two rows, weighted
    i0, i1, fk, wk = xs
    read = (read + (wk * (1.0 - fk))[..., None] * _rows(h, i0).astype(F32)
            + (wk * fk)[..., None] * _rows(h, i1).astype(F32))
    return read, None

  read, _ = jax.lax.scan(point, jnp.zeros(h.shape, F32), (p0, p1, f, _per_point(weight)))
  return read.astype(h.dtype)


def _xla_fwd(h, pos, weight):
  return xla(h, pos, weight), (h, pos, weight)


def _xla_bwd(res, d_read):
  h, pos, weight = res
  batch, length, groups, _ = h.shape
  p0, p1, f = map(_per_point, taps(pos, length))
  dr = d_read.astype(F32)
  b_idx = jnp.arange(batch)[:, None, None]
  g_idx = jnp.arange(groups)[None, None, :]

  def point(dh, xs):  # its rows again: the dots for d pos and d weight, and dh's scatter-add
    i0, i1, fk, wk = xs
    dot0 = jnp.sum(_rows(h, i0).astype(F32) * dr, axis=-1)
    dot1 = jnp.sum(_rows(h, i1).astype(F32) * dr, axis=-1)
    dh = dh.at[b_idx, i0, g_idx].add((wk * (1.0 - fk))[..., None] * dr)
    dh = dh.at[b_idx, i1, g_idx].add((wk * fk)[..., None] * dr)
    return dh, (wk * (dot1 - dot0), (1.0 - fk) * dot0 + fk * dot1)

  dh, (d_pos, d_weight) = jax.lax.scan(point, jnp.zeros(h.shape, F32),
                                       (p0, p1, f, _per_point(weight)))
  return dh.astype(h.dtype), jnp.moveaxis(d_pos, 0, -1), jnp.moveaxis(d_weight, 0, -1)


xla.defvjp(_xla_fwd, _xla_bwd)


def pallas_tpu(h, pos, weight, **kwargs):
  """The Mosaic kernels (read_pallas_tpu.read; kwargs: interpret, block_l)."""
  from kernels import read_pallas_tpu  # noqa: PLC0415 - it imports `taps` from here
  return read_pallas_tpu.read(h, pos, weight, **kwargs)


BACKENDS = {"reference": reference, "xla": xla, "pallas_tpu": pallas_tpu}
