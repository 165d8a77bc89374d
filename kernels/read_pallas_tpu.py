"""Pallas TPU (Mosaic) kernels of `memory_read` (kernels/read.py), under one custom_vjp.

XLA:TPU makes a serial loop of the scatter-add in the read's backward and moves whole (8, 128)
tiles for each gathered row of C channels: one Adaptor-T layer of b2 at batch 32 accessed
1.3 TB. Here the rows never leave VMEM, and gamma and scale are applied inside the kernels:
neither the read nor h' is written to HBM, in either direction.

Layout: h as it comes, (batch, L, G x C) with the G heads side by side in the lanes (no
transpose, and no padding of a head's C channels to 128 lanes). Both kernels run on a grid
(batch, L chunks), chunk axis sequential. The image's whole sequence h[b] (L, G x C) stays in
VMEM across its chunks (cast once to float32 scratch). Per chunk, its positions' tables are
copied into SMEM, where the scalar unit reads them: the location and weight of every (point,
head), and the scale of every head. Each is the positions-last argument as it comes (nothing
per position is padded to 128 lanes), and a chunk's part is a window of block_l columns (a
multiple of 128 lanes) that the kernel copies: XLA builds no tables and no per-chunk slabs,
except one for a ragged last chunk (its columns padded to block_l). The scalar unit takes each
location's two rows and fraction from it (`read.taps`' arithmetic). The kernels address one
row of h per tap, over the 128-lane window that holds the tap's head; a lane mask keeps the
head's channels:

* forward: out_t = scale_tg (h_t + gamma read_t) over head g's lanes, read_t = sum_k (1 - f)
  w h[p0] + f w h[p1];
* backward: with e = d out * gamma, for every tap the dot <h[p], e> over its head (one row of
  lanes per position; the chunk's rows are transposed in VMEM and written out positions last:
  d pos, d weight and the read's part of d scale are element-wise in them, in XLA) and
  dh[p] += scale w e into a float32 accumulator of the whole image that stays in VMEM over the
  chunks and is written once, after the last one; the residual path dh_t += scale d out_t, the
  dot <h_t, d out_t> per head for d scale, and d gamma += scale d out_t read_t (read again from
  the rows already loaded) accumulated over the image's chunks.
Residuals are the inputs only (h, pos, weight, gamma, scale). Positions past L in a ragged last
chunk read row 0 with weight 0 (its tables come padded) and have a masked cotangent.
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.read import taps

F32 = jnp.float32
VMEM_LIMIT_BYTES = 96 * 2**20  # above Mosaic's 16 MiB default when the whole image needs it


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_l: positions per grid step, a multiple of 128 (a chunk's table columns start at a
  whole lane tile) unless it covers L; their tables sit in SMEM: 2 x block_l x G x K words,
  and block_l x G for the scale. A VSS block with both adaptors, v5e, batch 32, fwd + bwd, GB
  per image at widths 96 / 192 / 384, when the tables were per-chunk slabs built by XLA:
  0.653 / 0.271 / 0.112 with 32, 0.620 / 0.248 / 0.103 with 128, 0.638 / 0.251 at the first
  two with 256; with the windows copied from the arguments, 0.599 / 0.242 with 128."""
  block_l: int = 128


@dataclasses.dataclass(frozen=True)
class _Config:
  length: int
  heads: int  # G
  channels: int  # C per head
  points: int  # K
  block_l: int
  cast: bool  # h is not float32: keep a float32 copy of the image in VMEM
  gamma: bool  # out = h + gamma * read (else the read)
  scale: bool  # out *= scale
  interpret: Any

  @property
  def n_chunks(self):
    return pl.cdiv(self.length, self.block_l)

  @property
  def ragged(self):  # a last chunk of fewer than block_l positions
    return self.length % self.block_l != 0

  @property
  def n_tables(self):  # location, weight, and the scale when there is one
    return 2 + self.scale

  @property
  def width(self):  # G x C lanes
    return self.heads * self.channels

  @property
  def dots_tile(self):  # the backward's dots of a chunk, one row per position, in whole tiles
    return pl.cdiv(self.block_l, 128) * 128, pl.cdiv(self.dot_lanes, 128) * 128

  @property
  def dot_lanes(self):  # per position: e0 and e1 of every (point, head), then <h, d out> per head
    return 2 * self.heads * self.points + self.heads


def read(h, pos, weight, gamma=None, scale=None, *, interpret=False, block_l=None):
  """memory_read on TPU: h (batch, L, G, C), pos and weight (batch, K, G, L) float32, gamma
  (G, C) or None, scale (batch, G, L) or None."""
  batch, length, groups, C = h.shape
  bl = block_l or BlockSizes().block_l
  bl = length if bl >= length else bl
  if bl != length and bl % 128:  # a chunk's table columns start at a whole lane tile
    raise ValueError(f"block_l={bl} must be a multiple of 128 (or at least L={length})")
  cfg = _Config(length, groups, C, pos.shape[1], bl, h.dtype != F32, gamma is not None,
                scale is not None, interpret)
  return _read(cfg, h, pos, weight, gamma, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _read(cfg, h, pos, weight, gamma, scale):
  tables = _tables(cfg, pos, weight, scale)
  out = _forward(cfg, tables, _lanes(h), _gamma_row(cfg, gamma))
  return out.reshape(h.shape)


def _read_fwd(cfg, h, pos, weight, gamma, scale):
  return _read(cfg, h, pos, weight, gamma, scale), (h, pos, weight, gamma, scale)


def _read_bwd(cfg, res, d_out):
  h, pos, weight, gamma, scale = res
  batch, K, G, L = pos.shape
  tables = _tables(cfg, pos, weight, scale)
  dh, dots, d_gamma = _backward(cfg, tables, _lanes(h), _lanes(d_out), _gamma_row(cfg, gamma))
  dots = dots[:, :, :L]  # (batch, dot lanes, L)
  e0 = dots[:, :G * K].reshape(batch, K, G, L)
  e1 = dots[:, G * K:2 * G * K].reshape(batch, K, G, L)
  f = taps(pos, L)[2]
  sc = 1.0 if scale is None else scale.astype(F32)[:, None]
  lerp_dot = (1.0 - f) * e0 + f * e1  # <lerp of the rows, d out * gamma>
  d_scale = None
  if scale is not None:
    d_scale = jnp.sum(weight * lerp_dot, axis=1)
    if gamma is not None:
      d_scale = d_scale + dots[:, 2 * G * K:]
    d_scale = d_scale.astype(scale.dtype)
  return (dh.reshape(h.shape), sc * weight * (e1 - e0), sc * lerp_dot,
          None if gamma is None else d_gamma.sum(0).reshape(gamma.shape).astype(gamma.dtype),
          d_scale)


_read.defvjp(_read_fwd, _read_bwd)


def _lanes(x_BLGC):
  batch, length, groups, C = x_BLGC.shape
  return x_BLGC.reshape(batch, length, groups * C)


def _gamma_row(cfg, gamma):
  return None if gamma is None else gamma.astype(F32).reshape(1, cfg.width)


def _tables(cfg, pos, weight, scale):
  """The SMEM tables, the arguments as they come, positions last: the location and the weight
  of every (point, head), (batch, K G, L) (a view of (batch, K, G, L)); and the scale of every
  head, (batch, G, L). A kernel copies its chunk's columns of each to SMEM. When L is not a
  multiple of block_l, then the tails too: each table's last chunk, padded to block_l columns
  (location 0, weight 0) (Mosaic copies no part of a row of 128-lane tiles to SMEM)."""
  batch, K, G, L = pos.shape
  out = [pos.reshape(batch, K * G, L), weight.reshape(batch, K * G, L)]
  if scale is not None:
    out.append(scale.astype(F32))
  if cfg.ragged:
    start = (cfg.n_chunks - 1) * cfg.block_l
    out += [jnp.pad(t[:, :, start:], [(0, 0), (0, 0), (0, cfg.n_chunks * cfg.block_l - L)])
            for t in out]
  return out


def _vmem_bytes(cfg, itemsize, backward):
  """Double-buffered blocks plus scratch, with Mosaic's (8, 128) padding."""
  pad = lambda rows, lanes, size=4: pl.cdiv(rows, 8) * 8 * pl.cdiv(lanes, 128) * 128 * size
  image, chunk = pad(cfg.length, cfg.width), pad(cfg.block_l, cfg.width)
  image_in = pad(cfg.length, cfg.width, itemsize)
  chunk_in = pad(cfg.block_l, cfg.width, itemsize)
  row = pad(1, cfg.width)
  dots = pad(cfg.dot_lanes, cfg.block_l)
  if backward:  # h and dh blocks, the d out chunk, the dots block, gamma and d gamma rows;
    # f32 copy, dh, d out, dots and d gamma scratch
    return (2 * (2 * image_in + chunk_in + dots + 2 * row) + image * (1 + cfg.cast) + chunk
            + pad(*cfg.dots_tile) + row)
  return 2 * (image_in + chunk_in + row) + image * cfg.cast + chunk


def _call(cfg, kernel, name, out_shape, in_specs, out_specs, scratch, tables, args, backward):
  batch = args[0].shape[0]
  need = _vmem_bytes(cfg, args[0].dtype.itemsize, backward)
  if need > VMEM_LIMIT_BYTES:
    raise ValueError(f"memory_read pallas_tpu: an image of L={cfg.length} x G*C={cfg.width} "
                     f"needs {need / 2**20:.0f} MiB of VMEM (limit "
                     f"{VMEM_LIMIT_BYTES / 2**20:.0f} MiB); use backend='xla'")
  smem = [pltpu.SMEM((t.shape[1], cfg.block_l), t.dtype) for t in tables[:cfg.n_tables]]
  scratch = scratch + smem + [pltpu.SemaphoreType.DMA((cfg.n_tables,))]
  present = [a for a in args if a is not None]
  specs = [s for a, s in zip(args, in_specs) if a is not None]
  return pl.pallas_call(
      functools.partial(kernel, cfg), out_shape=out_shape, grid=(batch, cfg.n_chunks),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * len(tables) + specs,
      out_specs=out_specs, scratch_shapes=scratch, interpret=cfg.interpret, name=name,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary"),
          vmem_limit_bytes=max(need * 5 // 4, 16 * 2**20) if need > 12 * 2**20 else None),
  )(*tables, *present)


def _specs(cfg):
  image = pl.BlockSpec((None, cfg.length, cfg.width), lambda b, c: (b, 0, 0))
  chunk = pl.BlockSpec((None, cfg.block_l, cfg.width), lambda b, c: (b, c, 0))
  row = pl.BlockSpec((1, cfg.width), lambda b, c: (0, 0))
  return image, chunk, row


def _load_tables(cfg, hbm_refs, smem, sem):
  """The chunk's columns of the tables, HBM -> SMEM; a ragged last chunk's from the tails."""
  b, c = pl.program_id(0), pl.program_id(1)
  hbm_refs, tails = hbm_refs[:cfg.n_tables], hbm_refs[cfg.n_tables:]

  def copy(srcs, dsts):
    copies = [pltpu.make_async_copy(src, dst, sem.at[i])
              for i, (src, dst) in enumerate(zip(srcs, dsts))]
    for cp in copies:
      cp.start()
    for cp in copies:
      cp.wait()

  if cfg.n_chunks == 1:
    copy([src.at[b] for src in hbm_refs], smem)
    return
  bl = cfg.block_l  # a multiple of 128
  whole = lambda: copy([src.at[b, :, pl.ds(pl.multiple_of(c * bl, bl), bl)] for src in hbm_refs],
                       smem)
  if not cfg.ragged:
    whole()
    return
  pl.when(c < cfg.n_chunks - 1)(whole)
  pl.when(c == cfg.n_chunks - 1)(lambda: copy([t.at[b] for t in tails], smem))


def _image_f32(cfg, h_ref, hf_s):
  """The image as float32 rows that a dynamic index can address (bf16 rows are packed)."""
  if not cfg.cast:
    return h_ref

  @pl.when(pl.program_id(1) == 0)
  def _():
    hf_s[...] = h_ref[...].astype(F32)

  return hf_s


def _tap(cfg, tables_s, t, g, k):
  """Tap (g, k) of the chunk's position t: its two rows, their weights (scale not included);
  the rows and the fraction as `read.taps` gives them."""
  e = k * cfg.heads + g
  p, wk = tables_s[0][e, t], tables_s[1][e, t]
  floor = p.astype(jnp.int32)  # truncates: one less where that rounded a negative p up
  floor = jnp.where(floor.astype(F32) > p, floor - 1, floor)
  fk = p - floor.astype(F32)
  i0 = jnp.clip(floor, 0, cfg.length - 1)
  return i0, jnp.minimum(i0 + 1, cfg.length - 1), wk * (1.0 - fk), wk * fk


def _scale(cfg, tables_s, t, g):
  return tables_s[2][g, t] if cfg.scale else None


def _head_windows(cfg):
  """Per head: the 128-aligned lane window (start, stop) that holds its C channels, and a
  (1, stop - start) boolean of its lanes there. A row is read only over its head's window
  (one or two vregs for C <= 128), not over all G x C lanes."""
  out = []
  for g in range(cfg.heads):
    lo, hi = g * cfg.channels, (g + 1) * cfg.channels
    start, stop = lo // 128 * 128, min(pl.cdiv(hi, 128) * 128, cfg.width)
    if stop - start < min(256, cfg.width):  # Mosaic cannot load one 128-lane part of a wider
      stop = min(start + 256, cfg.width)    # row at a dynamic row: take two vregs
      start = max(stop - 256, 0)
    lane = start + jax.lax.broadcasted_iota(jnp.int32, (1, stop - start), 1)
    out.append((start, stop, (lane >= lo) & (lane < hi)))
  return out


def _split(cfg, refs, n_in):
  """The kernel's refs: tables (HBM), inputs (gamma only when there is one), the rest."""
  n_tables = cfg.n_tables * (1 + cfg.ragged)
  tables, rest = refs[:n_tables], refs[n_tables:]
  inputs, rest = list(rest[:n_in - (not cfg.gamma)]), rest[n_in - (not cfg.gamma):]
  if not cfg.gamma:
    inputs.append(None)
  return tables, inputs, rest


# ---------------------------------------------------------------------------------------------
# Forward.

def _forward(cfg, tables, h_BLW, gamma_row):
  image, chunk, row = _specs(cfg)
  scratch = ([pltpu.VMEM((cfg.length, cfg.width), F32)] if cfg.cast else []) + [
      pltpu.VMEM((cfg.block_l, cfg.width), F32)]
  return _call(cfg, _fwd_kernel, "memory_read_fwd",
               jax.ShapeDtypeStruct(h_BLW.shape, h_BLW.dtype), [image, row], chunk, scratch,
               tables, [h_BLW, gamma_row], backward=False)


def _fwd_kernel(cfg, *refs):
  tables_hbm, (h_ref, gamma_ref), rest = _split(cfg, refs, 2)
  o_ref, rest = rest[0], rest[1:]
  hf_s = rest[0] if cfg.cast else None
  out_s, *rest = rest[cfg.cast:]
  tables_s, sem = rest[:-1], rest[-1]
  _load_tables(cfg, tables_hbm, tables_s, sem)
  hf = _image_f32(cfg, h_ref, hf_s)
  windows = _head_windows(cfg)
  first = pl.program_id(1) * cfg.block_l

  def position(t, carry):
    own = jnp.minimum(first + t, cfg.length - 1)  # this position's row (clamped past L)
    for g, (start, stop, mask) in enumerate(windows):
      acc = jnp.zeros((1, stop - start), F32)
      for k in range(cfg.points):
        i0, i1, w0, w1 = _tap(cfg, tables_s, t, g, k)
        acc = acc + w0 * hf[pl.ds(i0, 1), start:stop] + w1 * hf[pl.ds(i1, 1), start:stop]
      if cfg.gamma:
        acc = hf[pl.ds(own, 1), start:stop] + gamma_ref[:, start:stop] * acc
      if cfg.scale:
        acc = _scale(cfg, tables_s, t, g) * acc
      out_s[pl.ds(t, 1), start:stop] = jnp.where(mask, acc, out_s[pl.ds(t, 1), start:stop])
    return carry

  jax.lax.fori_loop(0, cfg.block_l, position, 0)
  o_ref[...] = out_s[...].astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------
# Backward.

def _backward(cfg, tables, h_BLW, dout_BLW, gamma_row):
  image, chunk, row = _specs(cfg)
  batch = h_BLW.shape[0]
  rows = cfg.n_chunks * cfg.block_l
  dots = pl.BlockSpec((None, cfg.dot_lanes, cfg.block_l), lambda b, c: (b, 0, c))
  d_gamma = pl.BlockSpec((None, 1, cfg.width), lambda b, c: (b, 0, 0))
  out_shape = [jax.ShapeDtypeStruct(h_BLW.shape, h_BLW.dtype),
               jax.ShapeDtypeStruct((batch, cfg.dot_lanes, rows), F32),
               jax.ShapeDtypeStruct((batch, 1, cfg.width), F32)]
  scratch = ([pltpu.VMEM((cfg.length, cfg.width), F32)] if cfg.cast else []) + [
      pltpu.VMEM((cfg.length, cfg.width), F32), pltpu.VMEM((cfg.block_l, cfg.width), F32),
      pltpu.VMEM(cfg.dots_tile, F32), pltpu.VMEM((1, cfg.width), F32)]
  dh, dots, d_gamma = _call(cfg, _bwd_kernel, "memory_read_bwd", out_shape,
                            [image, chunk, row], [image, dots, d_gamma], scratch, tables,
                            [h_BLW, dout_BLW, gamma_row], backward=True)
  return dh, dots, d_gamma


def _bwd_kernel(cfg, *refs):
  tables_hbm, (h_ref, dout_ref, gamma_ref), rest = _split(cfg, refs, 3)
  dh_ref, dots_ref, dgamma_ref = rest[:3]
  rest = rest[3:]
  hf_s = rest[0] if cfg.cast else None
  dh_s, dout_s, dots_s, dgamma_s, *rest = rest[cfg.cast:]
  tables_s, sem = rest[:-1], rest[-1]
  c = pl.program_id(1)
  _load_tables(cfg, tables_hbm, tables_s, sem)
  hf = _image_f32(cfg, h_ref, hf_s)
  windows = _head_windows(cfg)

  @pl.when(c == 0)
  def _():
    dh_s[...] = jnp.zeros_like(dh_s)
    dgamma_s[...] = jnp.zeros_like(dgamma_s)

  dout_s[...] = dout_ref[...].astype(F32)  # rows of a float32 chunk: a dynamic index reads them
  first = c * cfg.block_l
  lim = cfg.length - first  # rows t >= lim lie past L (a ragged last chunk)
  G, K = cfg.heads, cfg.points
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, cfg.dots_tile[1]), 1)

  def position(t, carry):
    own = jnp.minimum(first + t, cfg.length - 1)
    d = dout_s[pl.ds(t, 1), :]
    d = jnp.where(jnp.full(d.shape, t, jnp.int32) < lim, d, 0.0)
    e_row = d * gamma_ref[...] if cfg.gamma else d  # d read = scale * e
    dots = jnp.zeros((1, cfg.dots_tile[1]), F32)
    for g, (start, stop, mask) in enumerate(windows):
      e = jnp.where(mask, e_row[:, start:stop], 0.0)
      sc = _scale(cfg, tables_s, t, g)
      read = jnp.zeros((1, stop - start), F32)
      for k in range(K):
        i0, i1, w0, w1 = _tap(cfg, tables_s, t, g, k)
        r0, r1 = hf[pl.ds(i0, 1), start:stop], hf[pl.ds(i1, 1), start:stop]
        dots = jnp.where(lane == k * G + g, jnp.sum(r0 * e, axis=1, keepdims=True), dots)
        dots = jnp.where(lane == G * K + k * G + g, jnp.sum(r1 * e, axis=1, keepdims=True),
                         dots)
        s0, s1 = (w0, w1) if sc is None else (sc * w0, sc * w1)
        dh_s[pl.ds(i0, 1), start:stop] += s0 * e
        dh_s[pl.ds(i1, 1), start:stop] += s1 * e
        if cfg.gamma:
          read = read + w0 * r0 + w1 * r1
      if cfg.gamma:  # h' = h + gamma read: the residual path, d gamma, and <h, d out>
        d_g = jnp.where(mask, d[:, start:stop], 0.0)
        sd = d_g if sc is None else sc * d_g
        dh_s[pl.ds(own, 1), start:stop] += sd
        dgamma_s[:, start:stop] += sd * read
        hd = jnp.sum(hf[pl.ds(own, 1), start:stop] * d_g, axis=1, keepdims=True)
        dots = jnp.where(lane == 2 * G * K + g, hd, dots)
    dots_s[pl.ds(t, 1), :] = dots
    return carry

  jax.lax.fori_loop(0, cfg.block_l, position, 0)
  dots_ref[...] = dots_s[...].T[:cfg.dot_lanes, :cfg.block_l]  # positions last, for XLA

  @pl.when(c == cfg.n_chunks - 1)
  def _():
    dh_ref[...] = dh_s[...].astype(dh_ref.dtype)
    dgamma_ref[...] = dgamma_s[...]
