"""Pallas TPU (Mosaic) selective scan: forward and backward kernels under one `jax.custom_vjp`.

Layout: channels on lanes, time on sublanes. Both kernels run on a grid (batch, D tiles, L chunks)
with the chunk axis sequential ("arbitrary") and the state carried across it in VMEM scratch:

* forward: per chunk, delta' and delta'*u are computed for the whole (block_l, block_d) block into
  f32 scratch, then a loop over the chunk's steps updates h (N, block_d) and writes
  y_t = <h_t, C_t>; per-step rows move between VMEM and vregs 8 at a time as aligned (8, width)
  tiles. It writes y, the last state, and the state entering every chunk (batch, n_chunks, N, D)
  as the residual.
* backward: visits the chunks in the opposite order, recomputes the chunk's states from its entry
  state into VMEM, then runs dh_t = C_t dy_t + exp(delta'_{t+1} A) dh_{t+1} backwards, using
  exp(delta'_t A) h_{t-1} = h_t - delta'_t B_t u_t. dA, dD, dbias accumulate in resident
  per-(batch, tile) output blocks, dB/dC are written per tile; the wrapper sums these partials.

No (batch, L, D, N) tensor ever reaches HBM. B and C are read as (block_l, G*N) blocks holding
every group; each step picks lane d's group with masks, so D/G need not be a multiple of 128.
A ragged last chunk is masked with `jnp.where` (steps t >= L leave the state untouched), and
reverse=True walks the chunks and the steps inside them backwards: nothing is padded or flipped.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import F32, ScanConfig, softplus

VMEM_BUDGET_BYTES = 8 * 2**20  # blocks (double-buffered) + scratch; Mosaic's default limit is 16 MiB


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The scan's blocks on TPU; a size left None is chosen for the shape (`for_shape`).

  block_d: lanes per tile, D or a multiple of 128 dividing D. Default: the widest of
    512/384/256/128 dividing D (lane-dense, few grid steps; batch x tiles is the parallel
    work), else the full D.
  block_l: steps per chunk, L or a multiple of 8. Default: the longest of 512, 256, ..., 16
    steps whose backward working set fits VMEM_BUDGET_BYTES: per step, 20 + N f32 rows of
    block_d (7 double-buffered (block_l, block_d) blocks, 6 scratch rows and the states) and 12
    lane-padded B/C-like rows of G*N. The full L when that is shorter.
  """
  block_d: int | None = None
  block_l: int | None = None

  def for_shape(self, length, d_inner, n_state, groups):
    """These sizes, each None chosen for the shape; ValueError naming one that does not fit."""
    block_d, block_l = self.block_d, self.block_l
    if block_d is None:
      fits = [c for c in (512, 384, 256, 128) if d_inner % c == 0]
      block_d = fits[0] if fits else d_inner
    if block_d != d_inner and (block_d % 128 or d_inner % block_d):
      raise ValueError(f"block_d={block_d} must be D={d_inner} or a multiple of 128 dividing D")
    if block_l is None:
      per_step = 4 * block_d * (20 + n_state) + 4 * 12 * 128 * pl.cdiv(groups * n_state, 128)
      block_l = 512
      while block_l > 16 and block_l * per_step > VMEM_BUDGET_BYTES:
        block_l //= 2
    if block_l >= length:
      block_l = length
    elif block_l % 8:
      raise ValueError(f"block_l={block_l} must be a multiple of 8 (or at least L={length})")
    return BlockSizes(block_d, block_l)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse,
                   *, interpret=False, block_sizes=None):
  """Returns (y_BLD in u's dtype, last state (batch, D, N) float32); see kernels/api.py.
  block_sizes: a BlockSizes (None: every size chosen for the shape). interpret: False, or the
  Pallas TPU interpreter's parameters (any platform)."""
  del return_last_state  # the state is cheap: always returned, dropped by the caller
  _, length, d_inner = u.shape
  n_state, groups = A.shape[1], B.shape[2]
  blocks = (block_sizes or BlockSizes()).for_shape(length, d_inner, n_state, groups)
  cfg = ScanConfig(length, d_inner, n_state, groups, blocks.block_d, blocks.block_l,
                   bool(delta_softplus), bool(reverse), z is not None, interpret)
  return _scan(cfg, u, delta, A, B, C, D, z, delta_bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg, u, delta, A, B, C, D, z, delta_bias):
  y, _, last_BND = _forward(cfg, u, delta, A, B, C, D, z, delta_bias)
  return y, jnp.swapaxes(last_BND, 1, 2)


def _scan_fwd(cfg, u, delta, A, B, C, D, z, delta_bias):
  y, h0_BKND, last_BND = _forward(cfg, u, delta, A, B, C, D, z, delta_bias)
  return (y, jnp.swapaxes(last_BND, 1, 2)), (u, delta, A, B, C, D, z, delta_bias, h0_BKND)


def _scan_bwd(cfg, res, cts):
  u, delta, A, B, C, D, z, delta_bias, h0_BKND = res
  dy_BLD, dlast_BDN = cts
  return _backward(cfg, u, delta, A, B, C, D, z, delta_bias, h0_BKND, dy_BLD,
                   jnp.swapaxes(dlast_BDN, 1, 2).astype(F32))


_scan.defvjp(_scan_fwd, _scan_bwd)


# ---------------------------------------------------------------------------------------------
# Helpers shared by both kernels (traced inside the kernel body).

SUB = 8  # steps per sub-block: per-step rows move between VMEM and vregs as (8, width) tiles


def _block_of(cfg, c, backward):
  """The L block that grid step c visits: scan order forward, the opposite order backward."""
  return cfg.n_chunks - 1 - c if cfg.reverse != backward else c


class _Groups:
  """Moves B/C rows between their stored layout (., G*N) and the channel layout (., block_d) of
  this tile, where lane d holds group d // (D/G). With N = 1 it maps whole (SUB, .) tiles at
  once; with N > 1 one step at a time, (1, G*N) <-> (N, block_d), n going to sublanes."""

  def __init__(self, cfg):
    n, gn, bd = cfg.n_state, cfg.groups * cfg.n_state, cfg.block_d
    self.tiled = n == 1
    r = SUB if self.tiled else n
    per_group = cfg.d_inner // cfg.groups
    row = 0 if self.tiled else jax.lax.broadcasted_iota(jnp.int32, (r, gn), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (r, gn), 1)
    chan = jax.lax.broadcasted_iota(jnp.int32, (r, bd), 1) + pl.program_id(1) * bd
    self.sel = [col == g * n + row for g in range(cfg.groups)]
    self.lanes = [(chan >= g * per_group) & (chan < (g + 1) * per_group)
                  for g in range(cfg.groups)]

  def expand(self, x):
    """(SUB, G) -> (SUB, block_d), or one step's (1, G*N) -> (N, block_d): [., d] = x[group(d)]."""
    out = None
    for sel_g, lanes_g in zip(self.sel, self.lanes):
      col = jnp.sum(jnp.where(sel_g, x, 0.0), axis=1, keepdims=True)
      col = jnp.broadcast_to(col, lanes_g.shape)
      out = col if out is None else jnp.where(lanes_g, col, out)
    return out

  def sums(self, x):
    """Inverse direction, summing: [., g*N + n] = sum over this tile's channels d in group g."""
    out = 0.0
    for sel_g, lanes_g in zip(self.sel, self.lanes):
      col = jnp.sum(jnp.where(lanes_g, x, 0.0), axis=1, keepdims=True)
      part = jnp.where(sel_g, col, 0.0)
      out = out + (part if self.tiled else jnp.sum(part, axis=0, keepdims=True))
    return out


def _rows(cfg):
  return pl.cdiv(cfg.block_l, SUB) * SUB


def _as_f32(cfg, ref, scratch):
  """The block as f32 rows addressable per sub-block: the ref itself, or a cast into scratch."""
  if ref.dtype == F32 and cfg.block_l == _rows(cfg):
    return ref
  scratch[:cfg.block_l, :] = ref[...].astype(F32)
  return scratch


def _visit(cfg, backward, grp, ins, outs, step, carry, expand=(), reduce=()):
  """Runs the chunk's steps in scan order (backward=False) or the opposite order.

  step(t, rows_in, carry) -> (carry, rows_out) sees row t of every ref in `ins` and returns row t
  of every ref in `outs`; rows move SUB at a time as aligned tiles. Inputs listed in `expand` are
  B/C-like (stored (., G*N)) and reach `step` as (N, block_d); outputs in `reduce` leave `step`
  as (N, block_d) and are stored as group sums (., G*N).
  """
  last_first = cfg.reverse != backward
  n_sub = _rows(cfg) // SUB

  def sub_block(k, carry):
    base = pl.multiple_of((n_sub - 1 - k if last_first else k) * SUB, SUB)
    tiles = [r[pl.ds(base, SUB), :] for r in ins]
    if grp.tiled:
      tiles = [grp.expand(x) if j in expand else x for j, x in enumerate(tiles)]
    acc = [None] * len(outs)
    for i in (range(SUB - 1, -1, -1) if last_first else range(SUB)):
      rows = [x[i:i + 1, :] for x in tiles]
      if not grp.tiled:
        rows = [grp.expand(x) if j in expand else x for j, x in enumerate(rows)]
      carry, rows = step(base + i, rows, carry)
      if not grp.tiled:
        rows = [grp.sums(x) if j in reduce else x for j, x in enumerate(rows)]
      acc = [jnp.where(jax.lax.broadcasted_iota(jnp.int32, (SUB, x.shape[1]), 0) == i, x,
                       0.0 if a is None else a) for a, x in zip(acc, rows)]
    if grp.tiled:
      acc = [grp.sums(x) if j in reduce else x for j, x in enumerate(acc)]
    for r, a in zip(outs, acc):
      r[pl.ds(base, SUB), :] = a
    return carry

  return jax.lax.fori_loop(0, n_sub, sub_block, carry)


def _specs(cfg, backward):
  """BlockSpecs: per-step (block_l, block_d) and (block_l, G*N) blocks, per-tile vectors."""
  bl, bd, n, gn = cfg.block_l, cfg.block_d, cfg.n_state, cfg.groups * cfg.n_state
  blk = functools.partial(_block_of, cfg, backward=backward)
  return dict(
      bld=pl.BlockSpec((None, bl, bd), lambda b, j, c: (b, blk(c), j)),
      blk=pl.BlockSpec((None, bl, gn), lambda b, j, c: (b, blk(c), 0)),
      nd=pl.BlockSpec((n, bd), lambda b, j, c: (0, j)),
      d=pl.BlockSpec((1, bd), lambda b, j, c: (0, j)),
      bnd=pl.BlockSpec((None, n, bd), lambda b, j, c: (b, 0, j)),
      bknd=pl.BlockSpec((None, None, n, bd), lambda b, j, c: (b, blk(c), 0, j)),
      tblk=pl.BlockSpec((None, None, bl, gn), lambda b, j, c: (j, b, blk(c), 0)),
  )


def _inputs(cfg, u, delta, A, B, C, D, z, delta_bias, sp):
  """The kernels' first inputs in their order (z None when absent), their specs, and how often
  the grid fetches each: B and C once per tile of channels, the per-tile vectors once per
  image, the rest once."""
  batch, length, d_inner = u.shape
  gn = cfg.groups * cfg.n_state
  args = [u, delta, A.T, B.reshape(batch, length, gn), C.reshape(batch, length, gn),
          D.reshape(1, d_inner), delta_bias.reshape(1, d_inner), z]
  specs = [sp["bld"], sp["bld"], sp["nd"], sp["blk"], sp["blk"], sp["d"], sp["d"],
           sp["bld"] if cfg.has_z else None]
  fetches = [1, 1, batch, cfg.n_tiles, cfg.n_tiles, batch, batch, 1]
  return args, specs, fetches


def _call(cfg, kernel, name, out_shape, out_specs, scratch, args, in_specs, fetches):
  """The pallas_call (an absent input or output is None, and its ref in the kernel), with its
  cost for XLA's analysis (which counts a kernel as nothing otherwise): every input as often as
  the grid fetches it, every output once; the scan's count of counting.py (9 per state and
  channel step, and the D term) in FLOPs, the backward twice that (the states recomputed, then
  the adjoint), one exp per state step."""
  batch, length, d_inner = args[0].shape
  backward = name.endswith("bwd")
  nbytes = sum(a.size * a.dtype.itemsize * f for a, f in zip(args, fetches) if a is not None)
  nbytes += sum(math.prod(o.shape) * o.dtype.itemsize for o in out_shape if o is not None)
  steps = batch * length * d_inner
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), out_shape=out_shape,
      grid=(batch, cfg.n_tiles, cfg.n_chunks), in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch, interpret=cfg.interpret, name=name,
      cost_estimate=pl.CostEstimate(
          flops=(1 + backward) * steps * (9 * cfg.n_state + 1),
          transcendentals=(1 + backward) * steps * cfg.n_state, bytes_accessed=int(nbytes)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
  )(*args)


def _prologue(cfg, u_ref, delta_ref, B_ref, C_ref, bias_ref, dl_s, dlu_s, Bf_s, Cf_s):
  """delta' and delta'*u of the whole block into scratch. Returns delta + bias, u and the f32
  B, C refs the steps read."""
  x = delta_ref[...].astype(F32) + bias_ref[...]
  dl = softplus(x) if cfg.delta_softplus else x
  u = u_ref[...].astype(F32)
  dl_s[:cfg.block_l, :] = dl
  dlu_s[:cfg.block_l, :] = dl * u
  return x, u, _as_f32(cfg, B_ref, Bf_s), _as_f32(cfg, C_ref, Cf_s)


# ---------------------------------------------------------------------------------------------
# Forward.

def _forward(cfg, u, delta, A, B, C, D, z, delta_bias):
  batch, length, d_inner = u.shape
  n, gn, bd, rows = cfg.n_state, cfg.groups * cfg.n_state, cfg.block_d, _rows(cfg)
  sp = _specs(cfg, backward=False)
  args, in_specs, fetches = _inputs(cfg, u, delta, A, B, C, D, z, delta_bias, sp)
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype),
               jax.ShapeDtypeStruct((batch, cfg.n_chunks, n, d_inner), F32),
               jax.ShapeDtypeStruct((batch, n, d_inner), F32)]
  scratch = [pltpu.VMEM((n, bd), F32)] + [pltpu.VMEM((rows, bd), F32)] * 3 + \
            [pltpu.VMEM((rows, gn), F32)] * 2
  return _call(cfg, _fwd_kernel, "selective_scan_fwd", out_shape,
               [sp["bld"], sp["bknd"], sp["bnd"]], scratch, args, in_specs, fetches)


def _fwd_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref,  # inputs
                y_ref, h0_ref, last_ref,  # outputs: y, the state entering the chunk, the last
                h_s, dl_s, dlu_s, y_s, Bf_s, Cf_s,  # scratch: the state, per-step rows
                *, cfg):
  c = pl.program_id(2)
  lim = cfg.length - _block_of(cfg, c, False) * cfg.block_l  # rows >= lim lie past L

  @pl.when(c == 0)
  def _():
    h_s[...] = jnp.zeros_like(h_s)

  h0_ref[...] = h_s[...]
  _, u, Bf, Cf = _prologue(cfg, u_ref, delta_ref, B_ref, C_ref, bias_ref, dl_s, dlu_s, Bf_s,
                           Cf_s)
  A_ND = A_ref[...]
  grp = _Groups(cfg)

  def step(t, rows, h_ND):
    dl, dlu, B_ND, C_ND = rows
    h_new = jnp.exp(dl * A_ND) * h_ND + B_ND * dlu
    h_ND = jnp.where(jnp.full(A_ND.shape, t, jnp.int32) < lim, h_new, h_ND)
    return h_ND, [jnp.sum(h_ND * C_ND, axis=0, keepdims=True)]

  h_ND = _visit(cfg, False, grp, [dl_s, dlu_s, Bf, Cf], [y_s], step, h_s[...], expand=(2, 3))
  h_s[...] = h_ND
  last_ref[...] = h_ND
  y = y_s[:cfg.block_l, :] + D_ref[...] * u
  if z_ref is not None:
    zz = z_ref[...].astype(F32)
    y = y * zz * jax.nn.sigmoid(zz)
  y_ref[...] = y.astype(y_ref.dtype)


# ---------------------------------------------------------------------------------------------
# Backward.

def _backward(cfg, u, delta, A, B, C, D, z, delta_bias, h0_BKND, dy_BLD, dlast_BND):
  batch, length, d_inner = u.shape
  n, gn, bd, rows = cfg.n_state, cfg.groups * cfg.n_state, cfg.block_d, _rows(cfg)
  sp = _specs(cfg, backward=True)
  args, in_specs, fetches = _inputs(cfg, u, delta, A, B, C, D, z, delta_bias, sp)
  args += [dy_BLD, h0_BKND, dlast_BND]
  fetches += [1, 1, 1]
  in_specs += [sp["bld"], sp["bknd"], sp["bnd"]]
  sds = jax.ShapeDtypeStruct
  per_tile = sds((cfg.n_tiles, batch, length, gn), F32)
  out_shape = [sds(u.shape, u.dtype), sds(u.shape, delta.dtype),
               sds(u.shape, z.dtype) if cfg.has_z else None, per_tile, per_tile,
               sds((batch, n, d_inner), F32)] + [sds((batch, 1, d_inner), F32)] * 2
  b1d = pl.BlockSpec((None, 1, bd), lambda b, j, c: (b, 0, j))
  out_specs = [sp["bld"], sp["bld"], sp["bld"] if cfg.has_z else None, sp["tblk"], sp["tblk"],
               sp["bnd"], b1d, b1d]
  states = pltpu.VMEM((rows, bd) if n == 1 else (rows, n, bd), F32)
  scratch = [pltpu.VMEM((n, bd), F32), states] + [pltpu.VMEM((rows, bd), F32)] * 6 + \
            [pltpu.VMEM((rows, gn), F32)] * 4
  du, ddelta, dz, dB_part, dC_part, dA_BND, dD_B1D, dbias_B1D = _call(
      cfg, _bwd_kernel, "selective_scan_bwd", out_shape, out_specs, scratch, args, in_specs,
      fetches)
  dB = dB_part.sum(0).reshape(B.shape).astype(B.dtype)
  dC = dC_part.sum(0).reshape(C.shape).astype(C.dtype)
  return (du, ddelta, dA_BND.sum(0).T, dB, dC, dD_B1D.sum((0, 1)), dz,
          dbias_B1D.sum((0, 1)))


def _bwd_kernel(u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref,  # inputs
                dout_ref, h0_ref, dlast_ref,  # inputs: the cotangents, the chunks' entry states
                du_ref, ddelta_ref, dz_ref, dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref,  # outputs
                g_s, H_s, dl_s, dlu_s, y_s, ddl_s, dus_s, Uf_s, Bf_s, Cf_s, dB_s, dC_s,  # scratch
                *, cfg):
  bl = cfg.block_l
  c = pl.program_id(2)
  lim = cfg.length - _block_of(cfg, c, True) * bl

  @pl.when(c == 0)
  def _():
    g_s[...] = dlast_ref[...]
    dA_ref[...] = jnp.zeros_like(dA_ref)
    dD_ref[...] = jnp.zeros_like(dD_ref)
    dbias_ref[...] = jnp.zeros_like(dbias_ref)

  x, u, Bf, Cf = _prologue(cfg, u_ref, delta_ref, B_ref, C_ref, bias_ref, dl_s, dlu_s, Bf_s,
                           Cf_s)
  Uf = _as_f32(cfg, u_ref, Uf_s)
  A_ND = A_ref[...]
  grp = _Groups(cfg)
  valid = lambda t: jnp.full(A_ND.shape, t, jnp.int32) < lim
  flat = cfg.n_state == 1  # states of N = 1 live as (rows, block_d) and move by tiles

  def recompute(t, rows, h_ND):  # the chunk's states, in scan order, from its entry state
    dl, dlu, B_ND, C_ND = rows
    h_new = jnp.exp(dl * A_ND) * h_ND + B_ND * dlu
    h_ND = jnp.where(valid(t), h_new, h_ND)
    if not flat:
      H_s[t] = h_ND
    y = jnp.sum(h_ND * C_ND, axis=0, keepdims=True)
    return h_ND, [y, h_ND] if flat else [y]

  _visit(cfg, False, grp, [dl_s, dlu_s, Bf, Cf], [y_s, H_s] if flat else [y_s], recompute,
         h0_ref[...], expand=(2, 3))

  dout = dout_ref[...].astype(F32)
  if z_ref is not None:
    zz = z_ref[...].astype(F32)
    sig = jax.nn.sigmoid(zz)
    dz = dout * (y_s[:bl, :] + D_ref[...] * u) * sig * (1.0 + zz * (1.0 - sig))
    dz_ref[...] = dz.astype(dz_ref.dtype)
    dout = dout * zz * sig
  y_s[:bl, :] = dout  # from here on y_s holds dy, the cotangent of <h_t, C_t> + D u_t

  def reverse(t, rows, carry):  # dh_t = C_t dy_t + exp(delta'_{t+1} A) dh_{t+1}, backwards
    g_ND, dA_ND = carry
    dl, dlu, B_ND, C_ND, dy, u_1D = rows[:6]
    h_ND = rows[6] if flat else H_s[t]
    dh_ND = g_ND + C_ND * dy
    bu_ND = B_ND * u_1D
    hp_ND = h_ND - dl * bu_ND  # exp(delta'_t A) h_{t-1}
    ok = valid(t)
    dA_ND = jnp.where(ok, dA_ND + dh_ND * dl * hp_ND, dA_ND)
    g_new = jnp.where(ok, jnp.exp(dl * A_ND) * dh_ND, g_ND)
    return (g_new, dA_ND), [
        jnp.sum(dh_ND * (A_ND * hp_ND + bu_ND), axis=0, keepdims=True),  # d delta'
        jnp.sum(dh_ND * B_ND, axis=0, keepdims=True) * dl,  # du without the D term
        dh_ND * dlu, h_ND * dy]  # summed per group into dB_t, dC_t

  ins = [dl_s, dlu_s, Bf, Cf, y_s, Uf] + ([H_s] if flat else [])
  g_ND, dA_ND = _visit(cfg, True, grp, ins, [ddl_s, dus_s, dB_s, dC_s], reverse,
                       (g_s[...], jnp.zeros(A_ND.shape, F32)), expand=(2, 3), reduce=(2, 3))
  g_s[...] = g_ND
  dA_ref[...] += dA_ND

  dy = y_s[:bl, :]
  du_ref[...] = (dus_s[:bl, :] + dy * D_ref[...]).astype(du_ref.dtype)
  ddl = ddl_s[:bl, :]
  if cfg.delta_softplus:
    ddl = ddl * jax.nn.sigmoid(x)
  ddelta_ref[...] = ddl.astype(ddelta_ref.dtype)
  dB_ref[...] = dB_s[:bl, :]
  dC_ref[...] = dC_s[:bl, :]
  rows_ok = jax.lax.broadcasted_iota(jnp.int32, ddl.shape, 0) < lim
  dD_ref[...] += jnp.sum(jnp.where(rows_ok, dy * u, 0.0), axis=0, keepdims=True)
  dbias_ref[...] += jnp.sum(jnp.where(rows_ok, ddl, 0.0), axis=0, keepdims=True)
