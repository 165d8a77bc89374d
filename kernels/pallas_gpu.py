"""Selective scan as Pallas Triton kernels: the `pallas_gpu` backend (DESIGN.md §2).

Both kernels run one program per (batch, tile of `block_d` channels). A tile lies inside one
group (block_d divides D // G), so it reads one (N,) row of B and C per step.

Forward: the state h_DN (block_d, N) stays in registers while a loop walks the L steps (t runs
L-1 .. 0 when reverse: only the indices run backwards, nothing is flipped), loading per step the
(block_d,) rows of u, delta, z and storing the row of y. The loop body is unrolled 8 steps
deep, so the loads of a group of steps are issued ahead of the dependent recurrence.
Every `block_l` steps (a chunk, in scan order) it stores the state, (batch, n_chunks, D, N): the only
residual besides the inputs.

Backward: same grid; walks the chunks last to first in scan order. Per chunk it recomputes
the pre-step states from the chunk's stored start state into a per-program workspace
(block_l, block_d, N) (a barrier orders its writes and reads), then runs the adjoint recurrence
  dh_t = C_t dy_t + exp(delta'_{t+1} A) dh_{t+1}      (dh of the last step adds d last_state)
backwards over the chunk, writing du, ddelta, dz rows and per-tile partial dB, dC rows, and
keeping per-program sums for dA, dD and d delta_bias in registers. The wrapper sums partials
over the tiles of a group and over the batch. Nothing of size (batch, L, D, N) is in HBM.
A ragged last chunk is a shorter, statically sized loop.
"""
import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.common import F32, ScanConfig, softplus


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The scan's blocks on GPU; a size left None is chosen for the shape (`for_shape`).

  block_d: channels per program, a power of two dividing the group width D // G. Default: the
    largest such, at most 32: with N = 1 a tile is one warp holding one channel per lane (the
    scan is latency bound, so more, smaller programs do not help; wider tiles only lengthen
    each step).
  block_l: steps between stored states. Default 64 (or L): the residual holds L / block_l
    states and the backward workspace block_l * block_d * N floats per program.
  """
  block_d: int | None = None
  block_l: int | None = None

  def for_shape(self, length, d_inner, n_state, groups):
    """These sizes, each None chosen for the shape; ValueError naming one that does not fit."""
    del n_state  # the blocks do not depend on it; the padded N does (`_n_pad`)
    group = d_inner // groups
    block_d = self.block_d or min(group & -group, 32)
    if group % block_d or block_d & (block_d - 1):
      raise ValueError(f"block_d={block_d} must be a power of two dividing D // G = {group}")
    block_l = min(self.block_l or 64, length)
    if block_l < 1:
      raise ValueError(f"block_l={block_l} must be at least 1")
    return BlockSizes(block_d, block_l)


def _n_pad(cfg):
  """N rounded up to a power of two (Triton value shapes); padded states have A = B = C = 0,
  so they stay 0, and the loads of B, C, A are masked."""
  return pl.next_power_of_2(cfg.n_state)


def _num_warps(cfg):
  """One warp per 128 state elements, 1 (N = 1) to 4 (N = 16)."""
  return max(1, min(4, cfg.block_d * _n_pad(cfg) // 128))


def _unroll(cfg):
  """Steps per loop iteration: 8 on GPU, 1 in the interpreter (it compiles faster)."""
  return 1 if cfg.interpret else 8


def _sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


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


def _chunks(length, block_l, body, carry, backward):
  """carry = body(c, n_c, carry) over chunks c of n_c steps (the last one ragged), either order."""
  n_full, rem = divmod(length, block_l)
  full = lambda c, x: body(n_full - 1 - c if backward else c, block_l, x)
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

  def __init__(self, cfg, u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref):
    self.cfg, self.n_pad = cfg, _n_pad(cfg)
    self.b, self.j = pl.program_id(0), pl.program_id(1)
    self.g = self.j // (cfg.d_inner // cfg.groups // cfg.block_d)  # the program's group
    self.d = pl.ds(pl.multiple_of(self.j * cfg.block_d, cfg.block_d), cfg.block_d)
    self.refs = u_ref, delta_ref, B_ref, C_ref
    self.A_DN = self.load_n(A_ref, self.d)
    self.D_D, self.bias_D = D_ref[self.d], bias_ref[self.d]

  def load_n(self, ref, *idx):
    """ref[*idx, :N] as float32 padded with zeros to n_pad (a masked load when N < n_pad)."""
    if self.n_pad == self.cfg.n_state:
      return ref[(*idx, slice(None))].astype(F32)
    shape = (self.cfg.block_d, self.n_pad) if isinstance(idx[-1], pl.Slice) else (self.n_pad,)
    mask = jnp.broadcast_to(jnp.arange(self.n_pad) < self.cfg.n_state, shape)
    return pltriton.load(ref.at[(*idx, pl.ds(0, self.n_pad))], mask=mask, other=0.0).astype(F32)

  def time(self, i):
    """Scan position i -> time index t."""
    return self.cfg.length - 1 - i if self.cfg.reverse else i

  def row(self, ref, t):
    return ref[self.b, t, self.d].astype(F32)

  def load(self, t):
    """Returns u_D, delta_D (+ bias), delta'_D, B_N, C_N at time t, all float32."""
    u_ref, delta_ref, B_ref, C_ref = self.refs
    dl_D = self.row(delta_ref, t) + self.bias_D
    dlp_D = softplus(dl_D) if self.cfg.delta_softplus else dl_D
    B_N, C_N = self.load_n(B_ref, self.b, t, self.g), self.load_n(C_ref, self.b, t, self.g)
    return self.row(u_ref, t), dl_D, dlp_D, B_N, C_N

  def advance(self, h_DN, u_D, dlp_D, B_N):
    """h_t = exp(delta' A) h_{t-1} + delta' u B; also returns exp(delta' A)."""
    decay_DN = jnp.exp(dlp_D[:, None] * self.A_DN)
    return decay_DN * h_DN + (dlp_D * u_D)[:, None] * B_N[None, :], decay_DN


def _fwd_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref,  # inputs
                y_ref, last_ref, hs_ref,  # outputs: y, the last state, the chunks' start states
                *, cfg):
  s = _Step(cfg, u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref)

  def step(i, h_DN):
    t = s.time(i)
    u_D, _, dlp_D, B_N, C_N = s.load(t)
    h_DN, _ = s.advance(h_DN, u_D, dlp_D, B_N)
    y_D = jnp.sum(h_DN * C_N[None, :], axis=1) + s.D_D * u_D
    if z_ref is not None:
      z_D = s.row(z_ref, t)
      y_D = y_D * z_D * _sigmoid(z_D)
    y_ref[s.b, t, s.d] = y_D.astype(y_ref.dtype)
    return h_DN

  def chunk_body(c, n, h_DN):
    if hs_ref is not None:
      hs_ref[s.b, c, s.d, :] = h_DN
    return _loop(c * cfg.block_l, n, step, h_DN, _unroll(cfg))

  h0_DN = jnp.zeros((cfg.block_d, s.n_pad), F32)
  last_ref[s.b, s.d, :] = _chunks(cfg.length, cfg.block_l, chunk_body, h0_DN, backward=False)


def _bwd_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref,  # inputs
                hs_ref, dout_ref, dlast_ref,  # inputs: the chunks' start states, cotangents
                du_ref, ddelta_ref, dz_ref, dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref,  # outputs
                H_s,  # scratch (an output left unread): the pre-step states of a chunk
                *, cfg):
  s = _Step(cfg, u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref)
  b, j, d = s.b, s.j, s.d

  def chunk_body(c, n, carry):
    start = c * cfg.block_l

    def recompute(i, h_DN):  # stores the state before step i
      H_s[b, j, i - start] = h_DN
      u_D, _, dlp_D, B_N, _ = s.load(s.time(i))
      return s.advance(h_DN, u_D, dlp_D, B_N)[0]

    def adjoint(p, carry):
      i = start + n - 1 - p
      t = s.time(i)
      dh_DN, dA_DN, dD_D, dbias_D = carry
      u_D, dl_D, dlp_D, B_N, C_N = s.load(t)
      hprev_DN = H_s[b, j, i - start]
      h_DN, decay_DN = s.advance(hprev_DN, u_D, dlp_D, B_N)
      dout_D = s.row(dout_ref, t)
      if z_ref is not None:
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

    _loop(start, n, recompute, hs_ref[b, c, d, :], _unroll(cfg))
    _barrier(cfg.interpret)
    carry = _loop(0, n, adjoint, carry, _unroll(cfg))
    _barrier(cfg.interpret)  # the next chunk overwrites the workspace
    return carry

  zeros_D = jnp.zeros((cfg.block_d,), F32)
  carry = (s.load_n(dlast_ref, b, d), jnp.zeros_like(s.A_DN), zeros_D, zeros_D)
  _, dA_DN, dD_D, dbias_D = _chunks(cfg.length, cfg.block_l, chunk_body, carry, backward=True)
  dA_ref[b, d, :] = dA_DN
  dD_ref[b, d] = dD_D
  dbias_ref[b, d] = dbias_D


def _call(kernel, cfg, out_shape, name):
  """The kernel over one program per (image, tile of block_d channels); an absent input or
  output is None, and its ref in the kernel."""
  batch = out_shape[0].shape[0]
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), out_shape=out_shape, grid=(batch, cfg.n_tiles),
      interpret=cfg.interpret, name=name,
      compiler_params=pltriton.CompilerParams(num_warps=_num_warps(cfg), num_stages=1))


def _forward(u, delta, A, B, C, D, z, delta_bias, cfg, save):
  batch, _, d_inner = u.shape
  sds = jax.ShapeDtypeStruct
  out_shape = [sds(u.shape, u.dtype), sds((batch, d_inner, _n_pad(cfg)), F32),
               sds((batch, cfg.n_chunks, d_inner, _n_pad(cfg)), F32) if save else None]
  y, last, hs = _call(_fwd_kernel, cfg, out_shape, "selective_scan_fwd")(
      u, delta, A, B, C, D, delta_bias, z)
  return y, last[..., :cfg.n_state], hs


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _scan(u, delta, A, B, C, D, z, delta_bias, cfg):
  return tuple(_forward(u, delta, A, B, C, D, z, delta_bias, cfg, save=False)[:2])


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, cfg):
  y, last, hs = _forward(u, delta, A, B, C, D, z, delta_bias, cfg, save=True)
  return (y, last), (u, delta, A, B, C, D, z, delta_bias, hs)


def _scan_bwd(cfg, res, cts):
  u, delta, A, B, C, D, z, delta_bias, hs = res
  dy, dlast = cts
  batch, length, d_inner = u.shape
  n_pad = _n_pad(cfg)
  sds = jax.ShapeDtypeStruct
  per_tile = sds((batch, length, cfg.n_tiles, n_pad), F32)
  out_shape = [sds(u.shape, u.dtype), sds(u.shape, delta.dtype),
               sds(u.shape, z.dtype) if z is not None else None, per_tile, per_tile,
               sds((batch, d_inner, n_pad), F32), sds((batch, d_inner), F32),
               sds((batch, d_inner), F32),
               sds((batch, cfg.n_tiles, cfg.block_l, cfg.block_d, n_pad), F32)]
  du, ddelta, dz, dB_part, dC_part, dA_part, dD_part, dbias_part, _ = _call(
      _bwd_kernel, cfg, out_shape, "selective_scan_bwd")(
          u, delta, A, B, C, D, delta_bias, z, hs, dy, dlast.astype(F32))
  per_group = lambda p, like: p[..., :cfg.n_state].reshape(
      batch, length, cfg.groups, -1, cfg.n_state).sum(3).astype(like.dtype)
  return (du, ddelta, dA_part[..., :cfg.n_state].sum(0), per_group(dB_part, B),
          per_group(dC_part, C), dD_part.sum(0), dz, dbias_part.sum(0))


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                   reverse, *, interpret=False, block_sizes=None):
  """Selective scan on GPU (Pallas Triton); the backends' signature (see kernels/api.py).

  u, delta: (batch, L, D); A: (D, N) f32; B, C: (batch, L, G, N); D, delta_bias: (D,) f32;
  z: (batch, L, D) or None. block_sizes: a BlockSizes (None: every size chosen for the
  shape). interpret: run the kernels in Pallas' interpreter (any platform). Returns (y (batch,
  L, D) in u.dtype, last state (batch, D, N) float32), differentiable in every array argument.
  """
  del return_last_state  # the last state is always computed; the caller drops it
  _, length, d_inner = u.shape
  n_state, groups = A.shape[1], B.shape[2]
  blocks = (block_sizes or BlockSizes()).for_shape(length, d_inner, n_state, groups)
  cfg = ScanConfig(length, d_inner, n_state, groups, blocks.block_d, blocks.block_l,
                   bool(delta_softplus), bool(reverse), z is not None, bool(interpret))
  return _scan(u, delta, A.astype(F32), B, C, D.astype(F32), z, delta_bias.astype(F32), cfg)
