"""`memory_read`: Adaptor-T's interpolated read of earlier states (DESIGN.md §3), as an op.

  out = memory_read(h, pos, weight, gamma=None, scale=None, backend="auto")
  h: (batch, L, G, C)         G independent heads (Adaptor-T: route x channel group), C channels
  pos, weight: (batch, K, G, L) float32: K locations per head and position, and their weights
  gamma: (G, C) or None;  scale: (batch, G, L) or None
  read[b, i, g] = sum_k weight[b, k, g, i] * lerp(h[b, :, g], pos[b, k, g, i])
  lerp(x, p) = (1 - f) x[p0] + f x[p1],  p0 = floor(p), p1 = min(p0 + 1, L - 1), f = p - p0
  out = read                      when gamma is None,
        h + gamma * read          (Adaptor-T's h') otherwise;
  then out[b, i, g] *= scale[b, g, i] when scale is given (Adaptor-T's y = C h' of one route).

The per-position arguments put the positions last and the points first: on TPU an array's last
axis is padded to 128 lanes and its second-to-last to 8 sublanes, so (batch, L, G, K) would be
padded 32-fold and (batch, G, K, L) 2-fold for K = 4, where (batch, K, G, L) is not padded
when G is a multiple of 8 (Adaptor-T's 16 heads); h keeps a head's channels last, its heads side
by side (batch, L, G x C) in the Pallas kernels.
pos should lie in [0, L - 1] (Adaptor-T clips it); the rows read are clamped to the sequence.
`out` has h's dtype; products accumulate in float32. Gradients: dh (the residual path plus a
scatter-add of the weighted cotangent rows), d pos = weight (h[p1] - h[p0]) . d read,
d weight = lerp . d read, d gamma = sum over batch and positions of read * d h', d scale =
h' . d out. gamma and scale are inside the op so that its backward, which gathers every tap
again anyway, also recomputes `read` for their gradients: neither read nor h' is ever kept.

Backends, each with the same signature (h, pos, weight, gamma, scale) -> out:
  reference   gathers the 2K = 2 x K taps (batch, L, G, 2K, C) at once and lets autodiff
              differentiate them: obviously right, and it keeps every tap for the backward;
  xla         a custom_vjp that visits one location (two rows) at a time: the forward keeps
              only its inputs, the backward gathers each row again and scatter-adds into dh.
              Nothing of size 2K x h is ever live (the CPU and GPU default: gathers of
              contiguous rows and scatter-adds are native there: the GPU default);
  cpu         XLA FFI kernels for XLA:CPU (read_cpu.cc, built by `pip install -e .`): one pass
              per head over its positions, its rows in cache, the backward accumulating into dh
              in place, heads shared over the intra-op threads. XLA:CPU runs the xla path's
              gathers and scatter-adds one index vector at a time (benchmarks/read.py);
  pallas_tpu  Mosaic kernels (read_pallas_tpu.py): XLA:TPU turns the scatter-add into a
              serial loop over updates and its row gathers move whole tiles, so on TPU the rows
              are read and accumulated inside VMEM.
"auto" picks pallas_tpu on TPU, cpu on the CPU and xla elsewhere, inside one jitted function
(every branch is traced, only the compiled platform's is lowered). On TPU it follows what one
image needs of a core's VMEM (read_pallas_tpu.fits): the kernels both ways where the backward
fits (on v5e, b2's widths: images up to 544x544), the kernels' forward with xla's backward where
only the forward does (up to 800x800: ADE20K's evaluation), xla beyond (the multi-scale test's
largest views). pallas_tpu asked for by name refuses such an image in one line. Under a mesh
the call runs once per shard of the batch (per_shard.py).
"""
import functools

import jax
import jax.numpy as jnp

from kernels import common
from kernels.common import F32, taps  # noqa: F401 - taps: read.taps, part of the API
from kernels.per_shard import per_shard

ENV_VAR = "ADAPTOR_READ_BACKEND"  # overrides backend="auto" for every call in the process


def memory_read(h, pos, weight, gamma=None, scale=None, backend="auto"):
  """Weighted interpolated read of K locations per position and head, optionally as Adaptor-T's
  scale * (h + gamma * read); see the module docstring. backend: "auto" ($ADAPTOR_READ_BACKEND
  overrides it), one of BACKENDS, or a function (h, pos, weight, gamma, scale) -> out (the tests
  pass interpret-mode kernels this way)."""
  check(h, pos, weight, gamma, scale)
  call = resolve(backend, BACKENDS, "memory_read")
  return per_shard(call, (h, pos.astype(F32), weight.astype(F32), gamma, scale),
                   batched=(True, True, True, False, True), name="memory_read")


def resolve(backend, backends, op):
  """The function that `backend` names among `backends` (kernels/common.py's rule), "auto"
  being pallas_tpu on TPU (xla's backward, or xla, where an image does not fit the kernels'
  VMEM), cpu on the CPU and xla elsewhere; $ADAPTOR_READ_BACKEND overrides "auto"."""
  def tpu(*args):  # the Mosaic kernels where one image fits a core's VMEM, else XLA's
    from kernels import read_pallas_tpu  # noqa: PLC0415 - Mosaic, only for TPU
    if not read_pallas_tpu.fits(op, *args, backward=False):
      return backends["xla"](*args)
    if read_pallas_tpu.fits(op, *args, backward=True):
      return backends["pallas_tpu"](*args)
    return _forward_only(backends["pallas_tpu"], backends["xla"], *args)
  return common.resolve(op, backend, backends, ENV_VAR,
                        {"tpu": tpu, "cpu": "cpu", "default": "xla"})


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _forward_only(forward, backward, *args):
  """forward(*args), differentiated as backward(*args) is: the kernels' forward where only it
  fits VMEM, XLA's backward (its residuals are the inputs, as the kernels')."""
  return forward(*args)


def _forward_only_fwd(forward, backward, *args):
  return forward(*args), args


def _forward_only_bwd(forward, backward, args, ct):
  del forward
  return jax.vjp(backward, *args)[1](ct)


_forward_only.defvjp(_forward_only_fwd, _forward_only_bwd)


def check(h, pos, weight, gamma, scale, op="memory_read"):
  """Raises ValueError naming the argument whose shape or dtype breaks the contract (pos and
  weight None: learned_read's call, which checks the rest)."""
  def fail(msg):
    raise ValueError(f"{op}: {msg}")

  if h.ndim != 4:
    fail(f"h must be (batch, L, G, C), got shape {h.shape}")
  batch, length, groups, _ = h.shape
  if length == 0:
    fail("h has length L = 0")
  for name, x in (("pos", pos), ("weight", weight)):
    if x is None:
      continue
    if x.ndim != 4 or x.shape[0] != batch or x.shape[2:] != (groups, length):
      fail(f"{name} must be (batch, K, G, L) = {(batch, 'K', groups, length)}, got {x.shape}")
  if pos is not None and pos.shape != weight.shape:
    fail(f"pos and weight must have the same shape, got {pos.shape} and {weight.shape}")
  if gamma is not None and gamma.shape != h.shape[2:]:
    fail(f"gamma must be (G, C) = {h.shape[2:]}, got {gamma.shape}")
  if scale is not None and scale.shape != (batch, groups, length):
    fail(f"scale must be (batch, G, L) = {(batch, groups, length)}, got {scale.shape}")
  for name, x in (("h", h), ("pos", pos), ("weight", weight), ("gamma", gamma), ("scale", scale)):
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      fail(f"{name} must be floating point, got {x.dtype}")


def positions_first(x):
  """(batch, G, L) -> (batch, L, G): the scale in h's order."""
  return jnp.moveaxis(x, -1, 1)


def _per_point(x_BKGL):
  """(K, batch, L, G): the points first, for a loop over them."""
  return jnp.transpose(x_BKGL, (1, 0, 3, 2))


def combine(read, h, gamma, scale):
  """The op's output from the float32 read (batch, L, G, C): h + gamma * read, times scale
  (each when given)."""
  out = read if gamma is None else h.astype(F32) + gamma.astype(F32) * read
  return out if scale is None else out * positions_first(scale.astype(F32))[..., None]


# ---------------------------------------------------------------------------------------------
# reference: every tap at once, autodiff backward.

def reference(h, pos, weight, gamma=None, scale=None):
  length, K = h.shape[1], pos.shape[1]
  acc = jnp.promote_types(h.dtype, F32)
  pos, weight = (jnp.transpose(x, (0, 3, 2, 1)) for x in (pos, weight))  # (batch, L, G, K)
  p0, p1, f = taps(pos, length)
  idx_BLGJ = jnp.concatenate([p0, p1], axis=-1)  # J = 2K taps
  w_BLGJ = jnp.concatenate([weight * (1.0 - f), weight * f], axis=-1)
  batch, _, groups, C = h.shape
  flat = idx_BLGJ.transpose(0, 3, 1, 2).reshape(batch, 2 * K * length, groups, 1)
  taps_BJLGC = jnp.take_along_axis(h.astype(acc), flat, axis=1).reshape(
      batch, 2 * K, length, groups, C)
  read = jnp.einsum("bjlgc,bjlg->blgc", taps_BJLGC, w_BLGJ.transpose(0, 3, 1, 2).astype(acc))
  return combine(read, h, gamma, scale).astype(h.dtype)


# ---------------------------------------------------------------------------------------------
# xla: one location (two rows) at a time, hand-written backward.

def xla(h, pos, weight, gamma=None, scale=None):
  return _xla(h, pos, weight, gamma, scale)


@jax.custom_vjp
def _xla(h, pos, weight, gamma, scale):
  p0, p1, f = map(_per_point, taps(pos, h.shape[1]))

  def point(xs):  # one location: its two rows, gathered from h as it is, weighted
    i0, i1, fk, wk = xs
    return ((wk * (1.0 - fk))[..., None] * _rows(h, i0) + (wk * fk)[..., None] * _rows(h, i1))

  # The first point starts the sum (a loop carry that starts as zeros is made early by XLA
  # and kept until the loop runs).
  xs = (p0, p1, f, _per_point(weight))
  first, rest = jax.tree.map(lambda a: a[0], xs), jax.tree.map(lambda a: a[1:], xs)
  read = jax.lax.scan(lambda acc, x: (acc + point(x), None), point(first), rest)[0]
  return combine(read, h, gamma, scale).astype(h.dtype)


def _rows(h_BLGC, idx_BLG):
  """h[b, idx[b, i, g], g, :] for every (b, i, g): (batch, L, G, C) float32."""
  return jnp.take_along_axis(h_BLGC, idx_BLG[..., None], axis=1,
                             mode="promise_in_bounds").astype(F32)


def _row_index(h_BLGC):
  """idx (batch, L, G) -> the flat indices of the rows h[b, idx[b, i, g], g] in h as
  (batch L G, C) rows. XLA:CPU scatter-adds rows at 1-D indices twice as fast as at (b, i, g)
  index vectors (its gathers are fastest as they are)."""
  batch, length, groups, _ = h_BLGC.shape
  base = jnp.arange(batch)[:, None, None] * (length * groups) + jnp.arange(groups)
  return lambda idx_BLG: (base + idx_BLG * groups).reshape(-1)


def _xla_fwd(h, pos, weight, gamma, scale):
  return _xla(h, pos, weight, gamma, scale), (h, pos, weight, gamma, scale)


def _xla_bwd(res, d_out):
  # What would repeat a forward computation (a gathered row, a broadcast of gamma or scale) is
  # computed inside the loop, and the loop's carries start from the cotangent, not from zeros:
  # XLA:CPU merges identical computations after it has dropped optimization barriers, and
  # computes early what does not depend on the cotangent; either keeps a tensor of h's size
  # alive from the forward pass until here.
  h, pos, weight, gamma, scale = res
  batch, length, groups, C = h.shape
  rows = _row_index(h)
  p0, p1, f = map(_per_point, taps(pos, length))
  d_out = d_out.astype(F32)
  sc = jnp.ones(h.shape[:3], F32) if scale is None else positions_first(scale.astype(F32))

  def point(carry, xs):
    dh, read, d_scale = carry
    i0, i1, fk, wk = xs
    g_out = d_out if gamma is None else d_out * gamma.astype(F32)  # d read = sc * g_out
    r0, r1 = _rows(h, i0), _rows(h, i1)
    w0, w1 = wk * (1.0 - fk), wk * fk
    e0, e1 = jnp.sum(r0 * g_out, axis=-1), jnp.sum(r1 * g_out, axis=-1)
    for i, w in ((i0, w0), (i1, w1)):
      dh = dh.at[rows(i)].add(((sc * w)[..., None] * g_out).reshape(-1, C),
                              mode="promise_in_bounds")
    if gamma is not None:  # the read, for d gamma after the loop
      read = read + w0[..., None] * r0 + w1[..., None] * r1
    lerp = (1.0 - fk) * e0 + fk * e1
    d_scale = d_scale + wk * lerp  # the read's part of h' . d out
    return (dh, read, d_scale), (sc * wk * (e1 - e0), sc * lerp)

  if gamma is None:
    init = (jnp.zeros((batch * length * groups, C), F32), None, jnp.zeros(h.shape[:3], F32))
  else:  # h' = h + gamma * read: the residual path starts dh and d scale; the read starts
    # from the cotangent times 0 (a carry of zeros is made early and kept)
    init = ((d_out * sc[..., None]).reshape(-1, C), d_out * 0.0,
            jnp.sum(d_out * h.astype(F32), axis=-1))
  (dh, read, d_scale), (d_pos, d_weight) = jax.lax.scan(
      point, init, (p0, p1, f, _per_point(weight)))
  d_gamma = None
  if gamma is not None:  # d gamma = sum of d out * sc * read
    d_gamma = jnp.sum(d_out * sc[..., None] * read, axis=(0, 1)).astype(gamma.dtype)
  back = lambda x: jnp.transpose(x, (1, 0, 3, 2))  # (K, batch, L, G) -> (batch, K, G, L)
  return (dh.reshape(h.shape).astype(h.dtype), back(d_pos), back(d_weight), d_gamma,
          None if scale is None else jnp.moveaxis(d_scale, 1, -1).astype(scale.dtype))


_xla.defvjp(_xla_fwd, _xla_bwd)


def cpu(h, pos, weight, gamma=None, scale=None):
  """The XLA:CPU kernels (read_cpu.cpu)."""
  from kernels import read_cpu  # noqa: PLC0415 - built by setup.py; loaded when called
  return read_cpu.cpu(h, pos, weight, gamma, scale)


def pallas_tpu(h, pos, weight, gamma=None, scale=None, **kwargs):
  """The Mosaic kernels (read_pallas_tpu.read; kwargs: interpret, block_sizes)."""
  from kernels import read_pallas_tpu  # noqa: PLC0415 - Mosaic, only for TPU
  return read_pallas_tpu.read(h, pos, weight, gamma, scale, **kwargs)


BACKENDS = {"reference": reference, "xla": xla, "cpu": cpu, "pallas_tpu": pallas_tpu}
