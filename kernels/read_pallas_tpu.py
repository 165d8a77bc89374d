"""Pallas TPU (Mosaic) kernels of `memory_read` (kernels/read.py), under one custom_vjp.

XLA:TPU makes a serial loop of the scatter-add in the read's backward and moves whole (8, 128)
tiles for each gathered row of C channels: one Adaptor-T layer of b2 at batch 32 accessed
1.3 TB. Here the rows never leave VMEM.

Layout: h as it comes, (batch, L, G x C) with the G heads side by side in the lanes (no
transpose, and no padding of a head's C channels to 128 lanes). Both kernels run on a grid
(batch, L chunks), chunk axis sequential. The image's whole sequence h[b] (L, G x C) stays in
VMEM across its chunks (cast once to float32 scratch); the chunk's tap rows and tap weights
(block_l x G x 2K each) are copied into SMEM, where the scalar unit reads them and addresses one
row of h per tap, over the 128-lane window that holds the tap's head; a lane mask keeps the
head's channels:

* forward: read_t = sum_g mask_g sum_j w_tgj h[p_tgj], written as a block;
* backward: for every tap, dot_tgj = <mask_g h[p_tgj], d read_t> (written out: d pos and
  d weight are elementwise in them) and dh[p_tgj] += w_tgj mask_g d read_t into a float32
  accumulator of the whole image that stays in VMEM over the chunks and is written once, after
  the last one.
Residuals are the inputs only (h, pos, weight): no tap is ever written to HBM. Positions past L
in a ragged last chunk have zero tap weights and a masked cotangent.
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
  """block_l: positions per grid step (their taps sit in SMEM: 2 x block_l x G x 2K words)."""
  block_l: int = 32


@dataclasses.dataclass(frozen=True)
class _Config:
  length: int
  heads: int  # G
  channels: int  # C per head
  taps: int  # J = 2K per head
  block_l: int
  cast: bool  # h is not float32: keep a float32 copy of the image in VMEM
  interpret: Any

  @property
  def n_chunks(self):
    return pl.cdiv(self.length, self.block_l)

  @property
  def width(self):  # G x C lanes
    return self.heads * self.channels

  @property
  def table_size(self):  # a chunk's taps, padded to whole rows of 128 (and of 8 rows)
    return pl.cdiv(self.block_l * self.heads * self.taps, 1024) * 1024


def read(h, pos, weight, *, interpret=False, block_l=None):
  """memory_read on TPU: h (batch, L, G, C), pos and weight (batch, L, G, K) float32."""
  batch, length, groups, C = h.shape
  bl = block_l or BlockSizes().block_l
  bl = length if bl >= length else bl
  if bl != length and bl % 8:
    raise ValueError(f"block_l={bl} must be a multiple of 8 (or at least L={length})")
  cfg = _Config(length, groups, C, 2 * pos.shape[-1], bl, h.dtype != F32, interpret)
  return _read(cfg, h, pos, weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _read(cfg, h, pos, weight):
  idx, tw = _tap_tables(cfg, pos, weight)
  batch = h.shape[0]
  return _forward(cfg, idx, tw, h.reshape(batch, cfg.length, cfg.width)).reshape(h.shape)


def _read_fwd(cfg, h, pos, weight):
  return _read(cfg, h, pos, weight), (h, pos, weight)


def _read_bwd(cfg, res, d_read):
  h, pos, weight = res
  batch, length, groups, K = pos.shape
  idx, tw = _tap_tables(cfg, pos, weight)
  flat = lambda x: x.reshape(batch, length, cfg.width)
  dh, dots = _backward(cfg, idx, tw, flat(h), flat(d_read))
  dot0, dot1 = dots[:, :length, :groups * K], dots[:, :length, groups * K:]
  f = taps(pos.reshape(batch, length, groups * K), length)[2]
  w = weight.reshape(f.shape)
  return (dh.reshape(h.shape), (w * (dot1 - dot0)).reshape(pos.shape),
          ((1.0 - f) * dot0 + f * dot1).reshape(pos.shape))


_read.defvjp(_read_fwd, _read_bwd)


def _tap_tables(cfg, pos, weight):
  """Per image and chunk, (batch, n_chunks, rows, 128) tables of the rows read (int32) and their
  weights: the chunk's block_l x 2GK entries in (position, tap) order, tap j = which x GK + g x K
  + k (which 0: the floor row, 1: the next one), laid out 128 to a row so that the chunk is one
  dense tile-aligned slab to copy. Padded positions read row 0 with weight 0. Everything here
  keeps a lane-dense last axis: (G, K) or a trailing (K, 2) would be padded to 128 lanes."""
  batch, length = pos.shape[:2]
  p0, p1, f = taps(pos.reshape(batch, length, -1), cfg.length)
  w = weight.reshape(f.shape)
  pad = cfg.n_chunks * cfg.block_l - length
  n = cfg.block_l * cfg.heads * cfg.taps

  def table(a, b):
    x = jnp.pad(jnp.concatenate([a, b], axis=-1), [(0, 0), (0, pad), (0, 0)])
    x = jnp.pad(x.reshape(batch, cfg.n_chunks, n), [(0, 0), (0, 0), (0, cfg.table_size - n)])
    return x.reshape(batch, cfg.n_chunks, cfg.table_size // 128, 128)

  return table(p0, p1), table(w * (1.0 - f), w * f)


def _vmem_bytes(cfg, itemsize, backward):
  """Double-buffered blocks plus scratch, with Mosaic's (8, 128) padding."""
  pad = lambda rows, lanes, size=4: pl.cdiv(rows, 8) * 8 * pl.cdiv(lanes, 128) * 128 * size
  image, chunk = pad(cfg.length, cfg.width), pad(cfg.block_l, cfg.width)
  image_in = pad(cfg.length, cfg.width, itemsize)
  chunk_in = pad(cfg.block_l, cfg.width, itemsize)
  dots = pad(cfg.block_l, cfg.heads * cfg.taps)
  if backward:  # h and dh blocks, the d read chunk, the dots block; f32 copy, dh, dr, dots
    return 2 * (2 * image_in + chunk_in + dots) + image * (1 + cfg.cast) + chunk + dots
  return 2 * (image_in + chunk_in) + image * cfg.cast + chunk


def _call(cfg, kernel, name, out_shape, in_specs, out_specs, scratch, args, backward):
  batch = args[0].shape[0]
  need = _vmem_bytes(cfg, args[2].dtype.itemsize, backward)
  if need > VMEM_LIMIT_BYTES:
    raise ValueError(f"memory_read pallas_tpu: an image of L={cfg.length} x G*C={cfg.width} "
                     f"needs {need / 2**20:.0f} MiB of VMEM (limit "
                     f"{VMEM_LIMIT_BYTES / 2**20:.0f} MiB); use backend='xla'")
  rows = cfg.table_size // 128
  scratch = scratch + [pltpu.SMEM((rows, 128), jnp.int32), pltpu.SMEM((rows, 128), F32),
                       pltpu.SemaphoreType.DMA((2,))]
  return pl.pallas_call(
      functools.partial(kernel, cfg), out_shape=out_shape, grid=(batch, cfg.n_chunks),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 2 + in_specs, out_specs=out_specs,
      scratch_shapes=scratch, interpret=cfg.interpret, name=name,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary"),
          vmem_limit_bytes=max(need * 5 // 4, 16 * 2**20) if need > 12 * 2**20 else None),
  )(*args)


def _specs(cfg):
  image = pl.BlockSpec((None, cfg.length, cfg.width), lambda b, c: (b, 0, 0))
  chunk = pl.BlockSpec((None, cfg.block_l, cfg.width), lambda b, c: (b, c, 0))
  dots = pl.BlockSpec((None, cfg.block_l, cfg.heads * cfg.taps), lambda b, c: (b, c, 0))
  return image, chunk, dots


def _load_taps(idx_hbm, w_hbm, idx_s, w_s, sem):
  """The chunk's tap rows and weights, HBM -> SMEM."""
  b, c = pl.program_id(0), pl.program_id(1)
  copies = [pltpu.make_async_copy(src.at[b, c], dst, sem.at[i])
            for i, (src, dst) in enumerate(((idx_hbm, idx_s), (w_hbm, w_s)))]
  for cp in copies:
    cp.start()
  for cp in copies:
    cp.wait()


def _image_f32(cfg, h_ref, hf_s):
  """The image as float32 rows that a dynamic index can address (bf16 rows are packed)."""
  if not cfg.cast:
    return h_ref

  @pl.when(pl.program_id(1) == 0)
  def _():
    hf_s[...] = h_ref[...].astype(F32)

  return hf_s


def _entry(cfg, t, g, j):
  """Where tap j of head g at the chunk's position t sits in its table (see _tap_tables)."""
  K = cfg.taps // 2
  return t * (cfg.heads * cfg.taps) + (j // K) * (cfg.heads * K) + g * K + j % K


def _at(table_s, i):
  """Entry i (>= 0) of a (rows, 128) SMEM table (shifts: integer division would need the chip's
  generation to lower)."""
  return table_s[jax.lax.shift_right_logical(i, 7), i & 127]


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


# ---------------------------------------------------------------------------------------------
# Forward.

def _forward(cfg, idx, tw, h_BLW):
  image, chunk, _ = _specs(cfg)
  scratch = ([pltpu.VMEM((cfg.length, cfg.width), F32)] if cfg.cast else []) + [
      pltpu.VMEM((cfg.block_l, cfg.width), F32)]
  return _call(cfg, _fwd_kernel, "memory_read_fwd",
               jax.ShapeDtypeStruct(h_BLW.shape, h_BLW.dtype), [image], chunk, scratch,
               [idx, tw, h_BLW], backward=False)


def _fwd_kernel(cfg, idx_hbm, w_hbm, h_ref, o_ref, *scratch):
  hf_s = scratch[0] if cfg.cast else None
  out_s, idx_s, w_s, sem = scratch[cfg.cast:]
  _load_taps(idx_hbm, w_hbm, idx_s, w_s, sem)
  hf = _image_f32(cfg, h_ref, hf_s)
  windows = _head_windows(cfg)
  J = cfg.taps

  def position(t, carry):
    out_s[pl.ds(t, 1), :] = jnp.zeros((1, cfg.width), F32)
    for g, (start, stop, mask) in enumerate(windows):
      head = jnp.zeros((1, stop - start), F32)
      for j in range(J):
        i = _entry(cfg, t, g, j)
        head = head + _at(w_s, i) * hf[pl.ds(_at(idx_s, i), 1), start:stop]
      out_s[pl.ds(t, 1), start:stop] += jnp.where(mask, head, 0.0)
    return carry

  jax.lax.fori_loop(0, cfg.block_l, position, 0)
  o_ref[...] = out_s[...].astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------
# Backward.

def _backward(cfg, idx, tw, h_BLW, dr_BLW):
  image, chunk, dots = _specs(cfg)
  batch = h_BLW.shape[0]
  rows, lanes = cfg.n_chunks * cfg.block_l, cfg.heads * cfg.taps
  out_shape = [jax.ShapeDtypeStruct(h_BLW.shape, h_BLW.dtype),
               jax.ShapeDtypeStruct((batch, rows, lanes), F32)]
  scratch = ([pltpu.VMEM((cfg.length, cfg.width), F32)] if cfg.cast else []) + [
      pltpu.VMEM((cfg.length, cfg.width), F32), pltpu.VMEM((cfg.block_l, cfg.width), F32),
      pltpu.VMEM((cfg.block_l, lanes), F32)]
  return _call(cfg, _bwd_kernel, "memory_read_bwd", out_shape, [image, chunk], [image, dots],
               scratch, [idx, tw, h_BLW, dr_BLW], backward=True)


def _bwd_kernel(cfg, idx_hbm, w_hbm, h_ref, dr_ref, dh_ref, dots_ref, *scratch):
  hf_s = scratch[0] if cfg.cast else None
  dh_s, dr_s, dots_s, idx_s, w_s, sem = scratch[cfg.cast:]
  c = pl.program_id(1)
  _load_taps(idx_hbm, w_hbm, idx_s, w_s, sem)
  hf = _image_f32(cfg, h_ref, hf_s)
  windows = _head_windows(cfg)

  @pl.when(c == 0)
  def _():
    dh_s[...] = jnp.zeros_like(dh_s)

  dr_s[...] = dr_ref[...].astype(F32)
  lim = cfg.length - c * cfg.block_l  # rows t >= lim lie past L (a ragged last chunk)
  G, J = cfg.heads, cfg.taps
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, G * J), 1)

  def position(t, carry):
    dr = dr_s[pl.ds(t, 1), :]
    dr = jnp.where(jnp.full(dr.shape, t, jnp.int32) < lim, dr, 0.0)
    dots = jnp.zeros((1, G * J), F32)
    for g, (start, stop, mask) in enumerate(windows):
      dr_g = jnp.where(mask, dr[:, start:stop], 0.0)
      for j in range(J):
        i = _entry(cfg, t, g, j)
        row = _at(idx_s, i)
        dot = jnp.sum(hf[pl.ds(row, 1), start:stop] * dr_g, axis=1, keepdims=True)
        dots = jnp.where(lane == i - t * G * J, dot, dots)
        dh_s[pl.ds(row, 1), start:stop] += _at(w_s, i) * dr_g
    dots_s[pl.ds(t, 1), :] = dots
    return carry

  jax.lax.fori_loop(0, cfg.block_l, position, 0)
  dots_ref[...] = dots_s[...]

  @pl.when(c == cfg.n_chunks - 1)
  def _():
    dh_ref[...] = dh_s[...].astype(dh_ref.dtype)
