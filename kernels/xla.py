"""The XLA backend: a chunked selective scan in plain JAX, with a hand-written backward pass.

The sequence is cut into chunks of `chunk` steps. A `fori_loop` walks the chunks in scan order
carrying the (batch, D, N) state; inside a chunk the linear recurrence h_t = a_t h_{t-1} + b_t runs
as a parallel `lax.associative_scan` over (batch, chunk, D, N) temporaries. The forward keeps only
the state at the start of every chunk; the backward walks the chunks in the opposite order,
recomputes the chunk's states from that start state and runs the adjoint recurrence
dh_t = C_t dy_t + a_{t+1} dh_{t+1} the same way. Nothing of size (batch, L, D, N) is ever live,
so memory stays O(batch * L * D) for any N (see benchmarks/scan_memory.py).

The chunk size and the in-chunk scan were chosen by measurement: benchmarks/scan_xla_variants.py,
whose table is in benchmarks/README.md.
"""
import functools

import jax
import jax.numpy as jnp

from kernels.reference import expand_groups

CHUNK = 8


def _combine(first, second):
  """Composes x -> a1 x + b1 then x -> a2 x + b2."""
  a1, b1 = first
  a2, b2 = second
  return a1 * a2, a2 * b1 + b2


def _linear_scan(a_BTDN, b_BTDN, h0_BDN, reverse):
  """h_t = a_t h_{t-1} + b_t along axis 1 (backwards when reverse), starting from h0."""
  first = -1 if reverse else 0
  b_BTDN = b_BTDN.at[:, first].add(a_BTDN[:, first] * h0_BDN)
  return jax.lax.associative_scan(_combine, (a_BTDN, b_BTDN), reverse=reverse, axis=1)[1]


def _prepare(u, delta, B, C, z, delta_bias, delta_softplus, chunk):
  """float32 inputs padded to whole chunks; padded steps have delta' = u = B = C = 0, which
  leaves the state unchanged in either direction."""
  f32 = jnp.float32
  length = u.shape[1]
  pad = -length % chunk
  pad_time = lambda x: jnp.pad(x.astype(f32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  pre = delta.astype(f32) + delta_bias
  delta_p = jax.nn.softplus(pre) if delta_softplus else pre
  zs = None if z is None else pad_time(z)
  return pad_time(u), pad_time(delta_p), pad_time(B), pad_time(C), zs, pre


def _chunk_states(u, delta_p, A, B, h0, c, chunk, reverse):
  """The chunk's states (batch, chunk, D, N), its a_t and b_t."""
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=1)
  u_BTD, d_BTD = take(u), take(delta_p)
  B_BTDN = expand_groups(take(B), u.shape[-1])
  a_BTDN = jnp.exp(d_BTD[..., None] * A)
  b_BTDN = (d_BTD * u_BTD)[..., None] * B_BTDN
  return _linear_scan(a_BTDN, b_BTDN, h0, reverse), a_BTDN, b_BTDN, take


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, chunk):
  batch, length, d_inner = u.shape
  n_state = A.shape[1]
  us, ds, Bs, Cs, zs, _ = _prepare(u, delta, B, C, z, delta_bias, delta_softplus, chunk)
  n_chunks = us.shape[1] // chunk

  def body(i, carry):
    h_BDN, y, starts = carry
    c = n_chunks - 1 - i if reverse else i
    starts = starts.at[:, c].set(h_BDN)
    h_BTDN, _, _, take = _chunk_states(us, ds, A, Bs, h_BDN, c, chunk, reverse)
    y_BTD = jnp.einsum("btdn,btdn->btd", h_BTDN, expand_groups(take(Cs), d_inner))
    y = jax.lax.dynamic_update_slice_in_dim(y, y_BTD, c * chunk, axis=1)
    return h_BTDN[:, 0 if reverse else -1], y, starts

  init = (jnp.zeros((batch, d_inner, n_state), jnp.float32), jnp.zeros_like(us),
          jnp.zeros((batch, n_chunks, d_inner, n_state), jnp.float32))
  last, y, starts = jax.lax.fori_loop(0, n_chunks, body, init)
  y = y[:, :length] + us[:, :length] * D
  if z is not None:
    y = y * jax.nn.silu(zs[:, :length])
  return y.astype(u.dtype), last, starts


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                   reverse):
  y, last, _ = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, CHUNK)
  return y, last


def _fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse):
  y, last, starts = _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, CHUNK)
  return (y, last), (u, delta, A, B, C, D, z, delta_bias, starts)


def _bwd(delta_softplus, return_last_state, reverse, res, cotangents):
  u, delta, A, B, C, D, z, delta_bias, starts = res
  dout, dlast = cotangents
  chunk = CHUNK
  batch, length, d_inner = u.shape
  groups = B.shape[2]
  us, ds, Bs, Cs, zs, pre = _prepare(u, delta, B, C, z, delta_bias, delta_softplus, chunk)
  n_chunks = us.shape[1] // chunk
  dout = jnp.pad(dout.astype(jnp.float32), [(0, 0), (0, us.shape[1] - length), (0, 0)])
  dy = dout if z is None else dout * jax.nn.silu(zs)
  sum_group = lambda x_BTDN: x_BTDN.reshape(*x_BTDN.shape[:2], groups, -1,
                                            x_BTDN.shape[-1]).sum(3)

  def body(i, carry):
    dh_BDN, dA, du, ddelta_p, dB, dC, yz = carry
    c = i if reverse else n_chunks - 1 - i  # the opposite of the forward's order
    h_BTDN, a_BTDN, b_BTDN, take = _chunk_states(us, ds, A, Bs, starts[:, c], c, chunk, reverse)
    C_BTDN = expand_groups(take(Cs), d_inner)
    dy_BTD = take(dy)
    # dh_t = C_t dy_t + a_{t+1} dh_{t+1}: the same recurrence, run the other way.
    nxt = 1 if not reverse else -1
    a_next = jnp.roll(a_BTDN, -nxt, axis=1).at[:, -1 if not reverse else 0].set(1.0)
    g_BTDN = dy_BTD[..., None] * C_BTDN
    dh_BTDN = _linear_scan(a_next, g_BTDN, dh_BDN, not reverse)
    d_BTD, u_BTD = take(ds), take(us)
    prev_BTDN = h_BTDN - b_BTDN  # = a_t h_{t-1}
    B_BTDN = expand_groups(take(Bs), d_inner)
    ddelta_p = jax.lax.dynamic_update_slice_in_dim(
        ddelta_p, jnp.sum(dh_BTDN * (A * prev_BTDN + B_BTDN * u_BTD[..., None]), -1),
        c * chunk, axis=1)
    du = jax.lax.dynamic_update_slice_in_dim(
        du, d_BTD * jnp.sum(dh_BTDN * B_BTDN, -1), c * chunk, axis=1)
    dA = dA + jnp.einsum("btdn,btd->dn", dh_BTDN * prev_BTDN, d_BTD)
    dB = jax.lax.dynamic_update_slice_in_dim(
        dB, sum_group(dh_BTDN * (d_BTD * u_BTD)[..., None]), c * chunk, axis=1)
    dC = jax.lax.dynamic_update_slice_in_dim(
        dC, sum_group(h_BTDN * dy_BTD[..., None]), c * chunk, axis=1)
    yz = jax.lax.dynamic_update_slice_in_dim(
        yz, jnp.einsum("btdn,btdn->btd", h_BTDN, C_BTDN), c * chunk, axis=1)
    first = 0 if not reverse else -1
    return a_BTDN[:, first] * dh_BTDN[:, first], dA, du, ddelta_p, dB, dC, yz

  zeros_BLD = jnp.zeros_like(us)
  zeros_BLGN = jnp.zeros(Bs.shape, jnp.float32)
  init = (dlast.astype(jnp.float32), jnp.zeros_like(A), zeros_BLD, zeros_BLD, zeros_BLGN,
          zeros_BLGN, zeros_BLD)
  _, dA, du, ddelta_p, dB, dC, y_scan = jax.lax.fori_loop(0, n_chunks, body, init)

  cut = lambda x: x[:, :length]
  dy = cut(dy)
  du = cut(du) + dy * D
  dD = jnp.einsum("bld,bld->d", dy, cut(us))
  dz = None
  if z is not None:
    zf = cut(zs)
    sig = jax.nn.sigmoid(zf)
    dz = (cut(dout) * (cut(y_scan) + cut(us) * D) * sig * (1 + zf * (1 - sig))).astype(z.dtype)
  ddelta = cut(ddelta_p)
  if delta_softplus:
    ddelta = ddelta * jax.nn.sigmoid(pre)
  ddelta_bias = ddelta.sum((0, 1))
  return (du.astype(u.dtype), ddelta.astype(delta.dtype), dA, cut(dB).astype(B.dtype),
          cut(dC).astype(C.dtype), dD, dz, ddelta_bias)


selective_scan.defvjp(_fwd, _bwd)
