"""Selective scan as Pallas Triton kernels: the `pallas_gpu` backend (DESIGN.md §2).

Both kernels run one program per (batch, tile of `block_d` channels). A tile lies inside one
group (block_d divides D // G), so it reads one (N,) row of B and C per step.

Forward: the state h_DN (block_d, N) stays in registers while a loop walks the L steps (t runs
L-1 .. 0 when reverse: only the indices run backwards, nothing is flipped), loading per step the
(block_d,) rows of u, delta, z and storing the row of y. The loop body is unrolled 8 steps
deep, so the loads of a group of steps are issued ahead of the dependent recurrence.
Every `chunk` steps (in scan order) it stores the state, (batch, n_chunks, D, N): the only
residual besides the inputs.

Backward: same grid; walks the chunks last to first in scan order. Per chunk it recomputes
the pre-step states from the chunk's stored start state into a per-program workspace
(chunk, block_d, N) (a barrier orders its writes and reads), then runs the adjoint recurrence
  dh_t = C_t dy_t + exp(delta'_{t+1} A) dh_{t+1}      (dh of the last step adds d last_state)
backwards over the chunk, writing du, ddelta, dz rows and per-tile partial dB, dC rows, and
keeping per-program sums for dA, dD and d delta_bias in registers. The wrapper sums partials
over the tiles of a group and over the batch. Nothing of size (batch, L, D, N) is in HBM.
A ragged last chunk is a shorter, statically sized loop.
"""
import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

f32 = jnp.float32


class Config(NamedTuple):
  block_d: int
  n_pad: int  # padded states have A = B = C = 0, so they stay 0
  chunk: int
  num_warps: int
  delta_softplus: bool
  reverse: bool
  interpret: bool
  unroll: int  # steps per loop iteration: 8 on GPU, 1 in the interpreter (compiles faster)


def block_sizes(d_inner, groups, n_state, length, block_d=None, chunk=None):
  """Returns (block_d, n_pad, chunk, num_warps).

  block_d: the largest power of two dividing the group width D // G, at most 32: with N = 1
    a tile is one warp holding one channel per lane (the scan is latency bound, so more,
    smaller programs do not help; wider tiles only lengthen each step).
  n_pad: N rounded up to a power of two (Triton value shapes); B, C, A loads are masked.
  chunk: steps between stored states, 64 (or L): the residual holds L / chunk states and the
    backward workspace chunk * block_d * N floats per program.
  num_warps: one warp per 128 state elements, 1 (N = 1) to 4 (N = 16).
  """
  group = d_inner // groups
  block_d = block_d or min(group & -group, 32)
  if group % block_d or block_d & (block_d - 1):
    raise ValueError(f"block_d={block_d} must be a power of two dividing D // G = {group}")
  n_pad = pl.next_power_of_2(n_state)
  chunk = min(chunk or 64, length)
  num_warps = max(1, min(4, block_d * n_pad // 128))
  return block_d, n_pad, chunk, num_warps


def _sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def _softplus(x):
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _loop(start, n, body, carry, unroll):
  """carry = body(start + k, carry) for k = 0 .. n-1 (n static), `unroll` steps per iteration."""
  def group(k, carry):
    for s in range(unroll):
      carry = body(start + k * unroll + s, carry)
    return carry
  if n >= unroll:
    carry = lax.fori_loop(0, n // unroll, group, carry)
  for k in range(n - n % unroll, n):
    carry = body(start + k, carry)
  return carry


def _chunks(length, chunk, body, carry, backward):
  """carry = body(c, n_c, carry) over chunks c of n_c steps (the last one ragged), either order."""
  n_full, rem = divmod(length, chunk)
  full = lambda c, x: body(n_full - 1 - c if backward else c, chunk, x)
  if rem and backward:
    carry = body(n_full, rem, carry)
  if n_full:
    carry = lax.fori_loop(0, n_full, full, carry)
  if rem and not backward:
    carry = body(n_full, rem, carry)
  return carry


def _barrier(interpret):
  if not interpret:  # makes the workspace written by one thread visible to the others
    pltriton.debug_barrier()


class _Step:
  """Per-program indices and the per-step loads shared by both kernels."""

  def __init__(self, cfg, length, group_tiles, u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref,
               bias_ref, z_ref):
    self.cfg, self.length = cfg, length
    self.b, self.j = pl.program_id(0), pl.program_id(1)
    self.g = self.j // group_tiles
    self.d = pl.ds(pl.multiple_of(self.j * cfg.block_d, cfg.block_d), cfg.block_d)
    self.refs = u_ref, delta_ref, B_ref, C_ref, z_ref
    self.n_state = A_ref.shape[1]
    self.A_DN = self.load_n(A_ref, self.d)
    self.D_D, self.bias_D = D_ref[self.d], bias_ref[self.d]

  def load_n(self, ref, *idx):
    """ref[*idx, :N] as float32 padded with zeros to n_pad (a masked load when N < n_pad)."""
    n_pad = self.cfg.n_pad
    if n_pad == self.n_state:
      return ref[(*idx, slice(None))].astype(f32)
    shape = (self.cfg.block_d, n_pad) if isinstance(idx[-1], pl.Slice) else (n_pad,)
    mask = jnp.broadcast_to(jnp.arange(n_pad) < self.n_state, shape)
    return pltriton.load(ref.at[(*idx, pl.ds(0, n_pad))], mask=mask, other=0.0).astype(f32)

  def time(self, i):
    """Scan position i -> time index t."""
    return self.length - 1 - i if self.cfg.reverse else i

  def row(self, ref, t):
    return ref[self.b, t, self.d].astype(f32)

  def load(self, t):
    """Returns u_D, delta_D (+ bias), delta'_D, B_N, C_N at time t, all float32."""
    u_ref, delta_ref, B_ref, C_ref, _ = self.refs
    dl_D = self.row(delta_ref, t) + self.bias_D
    dlp_D = _softplus(dl_D) if self.cfg.delta_softplus else dl_D
    B_N, C_N = self.load_n(B_ref, self.b, t, self.g), self.load_n(C_ref, self.b, t, self.g)
    return self.row(u_ref, t), dl_D, dlp_D, B_N, C_N

  def advance(self, h_DN, u_D, dlp_D, B_N):
    """h_t = exp(delta' A) h_{t-1} + delta' u B; also returns exp(delta' A)."""
    decay_DN = jnp.exp(dlp_D[:, None] * self.A_DN)
    return decay_DN * h_DN + (dlp_D * u_D)[:, None] * B_N[None, :], decay_DN


def _fwd_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, *refs, cfg, length,
                group_tiles, has_z, save):
  z_ref = refs[0] if has_z else None
  y_ref, last_ref, *hs_ref = refs[has_z:]
  s = _Step(cfg, length, group_tiles, u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref,
            z_ref)

  def step(i, h_DN):
    t = s.time(i)
    u_D, _, dlp_D, B_N, C_N = s.load(t)
    h_DN, _ = s.advance(h_DN, u_D, dlp_D, B_N)
    y_D = jnp.sum(h_DN * C_N[None, :], axis=1) + s.D_D * u_D
    if has_z:
      z_D = s.row(z_ref, t)
      y_D = y_D * z_D * _sigmoid(z_D)
    y_ref[s.b, t, s.d] = y_D.astype(y_ref.dtype)
    return h_DN

  def chunk_body(c, n, h_DN):
    if save:
      hs_ref[0][s.b, c, s.d, :] = h_DN
    return _loop(c * cfg.chunk, n, step, h_DN, cfg.unroll)

  h0_DN = jnp.zeros((cfg.block_d, cfg.n_pad), f32)
  last_ref[s.b, s.d, :] = _chunks(length, cfg.chunk, chunk_body, h0_DN, backward=False)


def _bwd_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, *refs, cfg, length,
                group_tiles, has_z):
  z_ref = refs[0] if has_z else None
  hs_ref, dout_ref, dlast_ref, du_ref, ddelta_ref, *refs = refs[has_z:]
  dz_ref = refs[0] if has_z else None
  dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref, ws_ref = refs[has_z:]
  s = _Step(cfg, length, group_tiles, u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref,
            z_ref)
  b, j, d = s.b, s.j, s.d

  def chunk_body(c, n, carry):
    start = c * cfg.chunk

    def recompute(i, h_DN):  # stores the state before step i
      ws_ref[b, j, i - start] = h_DN
      u_D, _, dlp_D, B_N, _ = s.load(s.time(i))
      return s.advance(h_DN, u_D, dlp_D, B_N)[0]

    def adjoint(p, carry):
      i = start + n - 1 - p
      t = s.time(i)
      dh_DN, dA_DN, dD_D, dbias_D = carry
      u_D, dl_D, dlp_D, B_N, C_N = s.load(t)
      hprev_DN = ws_ref[b, j, i - start]
      h_DN, decay_DN = s.advance(hprev_DN, u_D, dlp_D, B_N)
      dout_D = s.row(dout_ref, t)
      if has_z:
        z_D = s.row(z_ref, t)
        sig_D = _sigmoid(z_D)
        dy_D = dout_D * z_D * sig_D
        y_D = jnp.sum(h_DN * C_N[None, :], axis=1) + s.D_D * u_D
        dz_D = dout_D * y_D * sig_D * (1.0 + z_D * (1.0 - sig_D))
        dz_ref[b, t, d] = dz_D.astype(dz_ref.dtype)
      else:
        dy_D = dout_D
      dh_DN = dh_DN + dy_D[:, None] * C_N[None, :]
      dC_ref[b, t, j, :] = jnp.sum(h_DN * dy_D[:, None], axis=0)
      dB_ref[b, t, j, :] = jnp.sum(dh_DN * (dlp_D * u_D)[:, None], axis=0)
      dec_h_DN = decay_DN * hprev_DN
      ddlp_D = jnp.sum(dh_DN * (s.A_DN * dec_h_DN + u_D[:, None] * B_N[None, :]), axis=1)
      du_D = dy_D * s.D_D + dlp_D * jnp.sum(dh_DN * B_N[None, :], axis=1)
      ddl_D = ddlp_D * _sigmoid(dl_D) if cfg.delta_softplus else ddlp_D
      du_ref[b, t, d] = du_D.astype(du_ref.dtype)
      ddelta_ref[b, t, d] = ddl_D.astype(ddelta_ref.dtype)
      return (dh_DN * decay_DN, dA_DN + dh_DN * dlp_D[:, None] * dec_h_DN,
              dD_D + dy_D * u_D, dbias_D + ddl_D)

    _loop(start, n, recompute, hs_ref[b, c, d, :], cfg.unroll)
    _barrier(cfg.interpret)
    carry = _loop(0, n, adjoint, carry, cfg.unroll)
    _barrier(cfg.interpret)  # the next chunk overwrites the workspace
    return carry

  zeros_D = jnp.zeros((cfg.block_d,), f32)
  carry = (s.load_n(dlast_ref, b, d), jnp.zeros_like(s.A_DN), zeros_D, zeros_D)
  _, dA_DN, dD_D, dbias_D = _chunks(length, cfg.chunk, chunk_body, carry, backward=True)
  dA_ref[b, d, :] = dA_DN
  dD_ref[b, d] = dD_D
  dbias_ref[b, d] = dbias_D


def _call(kernel, cfg, u, B, out_shape, name, **kw):
  batch, length, d_inner = u.shape
  group_tiles = d_inner // B.shape[2] // cfg.block_d
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg, length=length, group_tiles=group_tiles, **kw),
      out_shape=out_shape, grid=(batch, d_inner // cfg.block_d), interpret=cfg.interpret,
      compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
      name=name)


def _forward(u, delta, A, B, C, D, z, delta_bias, cfg, save):
  batch, length, d_inner = u.shape
  n_chunks = pl.cdiv(length, cfg.chunk)
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct((batch, d_inner, cfg.n_pad), f32)]
  if save:
    out_shape.append(jax.ShapeDtypeStruct((batch, n_chunks, d_inner, cfg.n_pad), f32))
  args = [u, delta, A, B, C, D, delta_bias] + ([z] if z is not None else [])
  y, last, *hs = _call(_fwd_kernel, cfg, u, B, out_shape, "selective_scan_fwd",
                       has_z=z is not None, save=save)(*args)
  return y, last[..., :A.shape[1]], *hs


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _scan(u, delta, A, B, C, D, z, delta_bias, cfg):
  return tuple(_forward(u, delta, A, B, C, D, z, delta_bias, cfg, save=False))


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, cfg):
  y, last, hs = _forward(u, delta, A, B, C, D, z, delta_bias, cfg, save=True)
  return (y, last), (u, delta, A, B, C, D, z, delta_bias, hs)


def _scan_bwd(cfg, res, cts):
  u, delta, A, B, C, D, z, delta_bias, hs = res
  dy, dlast = cts
  batch, length, d_inner = u.shape
  groups, n_state = B.shape[2:]
  n_tiles = d_inner // cfg.block_d
  sds = jax.ShapeDtypeStruct
  out_shape = ([sds(u.shape, u.dtype), sds(u.shape, delta.dtype)]
               + ([sds(u.shape, z.dtype)] if z is not None else [])
               + [sds((batch, length, n_tiles, cfg.n_pad), f32)] * 2
               + [sds((batch, d_inner, cfg.n_pad), f32)] + [sds((batch, d_inner), f32)] * 2
               + [sds((batch, n_tiles, cfg.chunk, cfg.block_d, cfg.n_pad), f32)])
  args = ([u, delta, A, B, C, D, delta_bias] + ([z] if z is not None else [])
          + [hs, dy, dlast.astype(f32)])
  outs = _call(_bwd_kernel, cfg, u, B, out_shape, "selective_scan_bwd",
               has_z=z is not None)(*args)
  du, ddelta, *outs = outs
  dz = outs.pop(0) if z is not None else None
  dB_part, dC_part, dA_part, dD_part, dbias_part, _ = outs
  per_group = lambda p, like: p[..., :n_state].reshape(batch, length, groups, -1, n_state).sum(
      3).astype(like.dtype)
  return (du, ddelta, dA_part[..., :n_state].sum(0), per_group(dB_part, B), per_group(dC_part, C),
          dD_part.sum(0), dz, dbias_part.sum(0))


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                   reverse, *, interpret=False, block_d=None, chunk=None):
  """Selective scan on GPU (Pallas Triton); the backends' signature (see kernels/api.py).

  u, delta: (batch, L, D); A: (D, N) f32; B, C: (batch, L, G, N); D, delta_bias: (D,) f32;
  z: (batch, L, D) or None. block_d, chunk: override `block_sizes`. interpret: run the
  kernels in Pallas' interpreter (any platform). Returns (y (batch, L, D) in u.dtype,
  last state (batch, D, N) float32), differentiable in every array argument.
  """
  del return_last_state  # the last state is always computed; the caller drops it
  batch, length, d_inner = u.shape
  sizes = block_sizes(d_inner, B.shape[2], A.shape[1], length, block_d, chunk)
  cfg = Config(*sizes, bool(delta_softplus), bool(reverse), bool(interpret), 1 if interpret else 8)
  return _scan(u, delta, A.astype(f32), B, C, D.astype(f32), z, delta_bias.astype(f32), cfg)
