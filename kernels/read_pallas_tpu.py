"""Pallas TPU (Mosaic) kernels of `memory_read` (kernels/read.py) and of `learned_read`
(kernels/learned.py), each under one custom_vjp.

XLA:TPU makes a serial loop of the scatter-add in the read's backward and moves whole (8, 128)
tiles for each gathered row of C channels: one Adaptor-T layer of b2 at batch 32 accessed
1.3 TB. Here the rows never leave VMEM, and gamma and scale are applied inside the kernels:
neither the read nor h' is written to HBM, in either direction.

Layout: h as it comes, (batch, L, G x C) with the G heads side by side in the lanes (no
transpose, and no padding of a head's C channels to 128 lanes). Both kernels run on a grid
(split, image, L chunk): two halves of the batch (a megacore chip's two cores; one half for an
odd batch), then their images and chunks in sequence. The image's whole sequence h[b]
(L, G x C) stays in VMEM across its chunks (cast once to float32 scratch). Per chunk, its
positions' tables sit in SMEM, where the scalar unit reads them: the location and weight of
every (point, head), and the scale of every head. Each comes positions last, (rows, chunk), and is one of:
* an argument as it comes (memory_read's pos and weight; the scale): the kernel copies its
  chunk's window of block_l columns (a multiple of 128 lanes) to SMEM, so XLA builds no tables
  and no per-chunk slabs, except one for a ragged last chunk (its columns padded to block_l);
* made in VMEM (learned_read): phi's product of the chunk's rows of h on the MXU, then the
  sigmoid, clip and softmax, copied VMEM -> SMEM (phi_pallas_tpu.py). phi's product never
  reaches HBM, nor do the locations, nor (backward) their gradients.
The scalar unit takes each location's two rows and fraction from its table (`read.taps`'
arithmetic). The kernels address one row of h per tap, over the 128-lane window that holds the
tap's head; a lane mask keeps the head's channels:

* forward: out_t = scale_tg (h_t + gamma read_t) over head g's lanes, read_t = sum_k (1 - f)
  w h[p0] + f w h[p1];
* backward: with e = scale d out * gamma (d read), for every tap the dot <h[p], e> over its head
  (one row of lanes per position; the chunk's rows are transposed in VMEM, positions last:
  d pos, d weight are element-wise in them) and dh[p] += w e into a float32 accumulator of
  the whole image that stays in VMEM over the chunks and is written once, after the last one;
  the residual path dh_t += scale d out_t, d scale = <h'_t, d out_t> per head, and d gamma +=
  scale d out_t read_t (read again from the rows already loaded) summed over the split's
  images. memory_read writes the dots out for XLA; learned_read takes them on in VMEM: d pos
  and d weight through the softmax, clip and sigmoid to d logits g, then per route
  dh[chunk, window] += g^T W_r, d W_r += g h[chunk, window] and d b += sum g, summed over the
  split's images (two small MXU products per route and chunk).
Residuals are the inputs only. Positions past L in a ragged last chunk read row 0 with weight 0
(memory_read: its tables come padded; learned_read: its image is padded with zero rows) and
have a masked cotangent.

XLA's cost analysis counts a Mosaic call as nothing unless it is told: each call states its
FLOPs, exps and bytes (every argument and result once: the grid fetches each block once).
"""
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import phi_pallas_tpu
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
  two with 256; with the windows copied from the arguments, 0.599 / 0.242 with 128 (XLA's
  ops only: the kernels stated no cost then, and XLA counts such a kernel as nothing)."""
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
  phi: bool = False  # learned_read: the locations and weights from phi's product of h
  batch: int = 1
  routes: int = 1  # learned_read's R: phi is a product per route of G / R heads

  @property
  def route_rows(self):  # a route's phi outputs: its K S locations, then its K S weights
    return self.logits // self.routes

  @property
  def route_window(self):
    """(width, starts): each route's phi reads its D = width / R lanes of h inside a lane
    window of this width that starts at a whole lane tile (its start per route)."""
    D = self.width // self.routes
    need = max(min(pl.cdiv((r + 1) * D, 128) * 128, self.width) - r * D // 128 * 128
               for r in range(self.routes))
    return need, tuple(min(r * D // 128 * 128, self.width - need) for r in range(self.routes))

  @property
  def splits(self):  # the grid's parallel axis (a megacore chip's two cores): halves of the
    return 2 if self.batch % 2 == 0 else 1  # batch, each summing its images' d gamma, d W

  @property
  def per_split(self):
    return self.batch // self.splits

  @property
  def n_chunks(self):
    return pl.cdiv(self.length, self.block_l)

  @property
  def ragged(self):  # a last chunk of fewer than block_l positions
    return self.length % self.block_l != 0

  @property
  def n_tables(self):  # the tables that come from HBM: location and weight unless phi makes
    return 2 * (not self.phi) + self.scale  # them, the scale when there is one

  @property
  def width(self):  # G x C lanes
    return self.heads * self.channels

  @property
  def chunk_lanes(self):  # a chunk's positions in whole lane tiles
    return pl.cdiv(self.block_l, 128) * 128

  @property
  def rows(self):  # the image's rows in VMEM: whole chunks of chunk_lanes when phi reads them
    return self.n_chunks * self.chunk_lanes if self.phi else self.length

  @property
  def copy(self):  # the image kept in float32 scratch: cast, or padded with zero rows
    return self.cast or self.rows != self.length

  @property
  def logits(self):  # phi's outputs per position: (location or weight, point, head)
    return 2 * self.points * self.heads

  @property
  def dots_tile(self):  # the backward's dots of a chunk, one row per position, in whole tiles
    return self.chunk_lanes, pl.cdiv(self.dot_lanes, 128) * 128

  @property
  def dot_lanes(self):  # per position: e0 and e1 of every (point, head), then d scale per head
    return 2 * self.heads * self.points + self.heads


def _config(h, points, gamma, scale, block_l, interpret, routes=None):
  batch, length, groups, C = h.shape
  bl = block_l or BlockSizes().block_l
  bl = length if bl >= length else bl
  if bl != length and bl % 128:  # a chunk's table columns start at a whole lane tile
    raise ValueError(f"block_l={bl} must be a multiple of 128 (or at least L={length})")
  return _Config(length, groups, C, points, bl, h.dtype != F32, gamma is not None,
                 scale is not None, interpret, routes is not None, batch, routes or 1)


# ---------------------------------------------------------------------------------------------
# memory_read: the tables given.

def read(h, pos, weight, gamma=None, scale=None, *, interpret=False, block_l=None):
  """memory_read on TPU: h (batch, L, G, C), pos and weight (batch, K, G, L) float32, gamma
  (G, C) or None, scale (batch, G, L) or None."""
  cfg = _config(h, pos.shape[1], gamma, scale, block_l, interpret)
  return _read(cfg, h, pos, weight, gamma, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _read(cfg, h, pos, weight, gamma, scale):
  out = _forward(cfg, _tables(cfg, pos, weight, scale), _lanes(h), _gamma_row(cfg, gamma))
  return out.reshape(h.shape)


def _read_fwd(cfg, h, pos, weight, gamma, scale):
  return _read(cfg, h, pos, weight, gamma, scale), (h, pos, weight, gamma, scale)


def _read_bwd(cfg, res, d_out):
  h, pos, weight, gamma, scale = res
  batch, K, G, L = pos.shape
  out = _backward(cfg, _tables(cfg, pos, weight, scale), _lanes(h), _lanes(d_out),
                  _gamma_row(cfg, gamma))
  dots = out["dots"][:, :, :L]  # (batch, dot lanes, L), the scale in e0 and e1
  e0 = dots[:, :G * K].reshape(batch, K, G, L)
  e1 = dots[:, G * K:2 * G * K].reshape(batch, K, G, L)
  f = taps(pos, L)[2]
  return (out["dh"].reshape(h.shape), weight * (e1 - e0), (1.0 - f) * e0 + f * e1,
          _d_gamma(out, gamma),
          None if scale is None else dots[:, 2 * G * K:].astype(scale.dtype))


_read.defvjp(_read_fwd, _read_bwd)


# ---------------------------------------------------------------------------------------------
# learned_read: phi's product of h gives the tables.

def learned(h, w, b, reach, gamma=None, scale=None, *, interpret=False, block_l=None):
  """learned_read on TPU (kernels/learned.py's contract): h (batch, L, G, C); w (R, S C, 2 K S)
  and b (R, 2 K S), each route's phi; reach (G,) float32; gamma (G, C) or None; scale
  (batch, G, L) or None."""
  R, D, J = w.shape
  cfg = _config(h, J * R // (2 * h.shape[2]), gamma, scale, block_l, interpret, routes=R)
  width, starts = cfg.route_window
  # each route's W^T (2 K S, D) at its lanes' place in its window, zeros around (autodiff
  # takes d W back out of d W_window)
  w_window = jnp.stack([jnp.pad(w[r].T, [(0, 0), (r * D - a, width - r * D + a - D)])
                        for r, a in enumerate(starts)])
  return _learned(cfg, h, w_window, b, reach, gamma, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _learned(cfg, h, w, b, reach, gamma, scale):
  out = _forward(cfg, _tables(cfg, None, None, scale), _lanes(h), _gamma_row(cfg, gamma),
                 phi_pallas_tpu.args(cfg, w, b, reach, h.dtype))
  return out.reshape(h.shape)


def _learned_fwd(cfg, h, w, b, reach, gamma, scale):
  return _learned(cfg, h, w, b, reach, gamma, scale), (h, w, b, reach, gamma, scale)


def _learned_bwd(cfg, res, d_out):
  h, w, b, reach, gamma, scale = res
  out = _backward(cfg, _tables(cfg, None, None, scale), _lanes(h), _lanes(d_out),
                  _gamma_row(cfg, gamma), phi_pallas_tpu.args(cfg, w, b, reach, h.dtype))
  d_scale = None
  if scale is not None:
    d_scale = out["dots"][:, :, :cfg.length].astype(scale.dtype)
  return (out["dh"].reshape(h.shape), out["dw"].sum(0).astype(w.dtype),
          out["db"].sum(0).reshape(b.shape).astype(b.dtype), jnp.zeros_like(reach),
          _d_gamma(out, gamma), d_scale)


_learned.defvjp(_learned_fwd, _learned_bwd)


def _lanes(x_BLGC):
  batch, length, groups, C = x_BLGC.shape
  return x_BLGC.reshape(batch, length, groups * C)


def _gamma_row(cfg, gamma):
  return None if gamma is None else gamma.astype(F32).reshape(1, cfg.width)


def _d_gamma(out, gamma):
  return None if gamma is None else out["dgamma"].sum(0).reshape(gamma.shape).astype(gamma.dtype)


def _tables(cfg, pos, weight, scale):
  """The HBM tables, the arguments as they come, positions last: the location and the weight
  of every (point, head), (batch, K G, L) (a view of (batch, K, G, L)), unless phi makes them;
  and the scale of every head, (batch, G, L). A kernel copies its chunk's columns of each to
  SMEM. When L is not a multiple of block_l, then the tails too: each table's last chunk,
  padded to block_l columns (location 0, weight 0) (Mosaic copies no part of a row of 128-lane
  tiles to SMEM)."""
  out = []
  if pos is not None:
    batch, K, G, L = pos.shape
    out += [pos.reshape(batch, K * G, L), weight.reshape(batch, K * G, L)]
  if scale is not None:
    out.append(scale.astype(F32))
  if cfg.ragged:
    start = (cfg.n_chunks - 1) * cfg.block_l
    out += [jnp.pad(t[:, :, start:], [(0, 0), (0, 0), (0, cfg.n_chunks * cfg.block_l - cfg.length)])
            for t in out]
  return out


def _vmem_bytes(cfg, itemsize, backward):
  """Double-buffered blocks plus scratch, with Mosaic's (8, 128) padding."""
  pad = lambda rows, lanes, size=4: pl.cdiv(rows, 8) * 8 * pl.cdiv(lanes, 128) * 128 * size
  image, chunk = pad(cfg.rows, cfg.width), pad(cfg.chunk_lanes, cfg.width)
  image_in = pad(cfg.length, cfg.width, itemsize)
  chunk_in = pad(cfg.block_l, cfg.width, itemsize)
  row = pad(1, cfg.width)
  phi = 0
  if cfg.phi:  # W, b and reach blocks; the tables and phi's product of a chunk; in the
    # backward also d W and d b (blocks and scratch), the reach factors and d logits
    w, col = pad(cfg.logits, cfg.route_window[0]), pad(cfg.logits, 1)
    tables = pad(cfg.logits, cfg.chunk_lanes)
    phi = 2 * (w + 2 * col) + 2 * tables + backward * (3 * (w + col) + 2 * tables + chunk)
  if backward:  # h and dh blocks, the d out chunk, the dots block, gamma and d gamma rows;
    # f32 copy, dh, d out, dots and d gamma scratch
    dots = pad(cfg.dot_lanes, cfg.chunk_lanes)
    return (2 * (2 * image_in + chunk_in + dots + 2 * row) + image * (1 + cfg.copy) + chunk
            + pad(*cfg.dots_tile) + row + phi)
  return 2 * (image_in + chunk_in + row) + image * cfg.copy + chunk + phi


def _call(cfg, kernel, name, out_shape, in_specs, out_specs, scratch, tables, args, backward):
  need = _vmem_bytes(cfg, args[0].dtype.itemsize, backward)
  if need > VMEM_LIMIT_BYTES:
    raise ValueError(f"{name.rsplit('_', 1)[0]} pallas_tpu: an image of L={cfg.length} x "
                     f"G*C={cfg.width} needs {need / 2**20:.0f} MiB of VMEM (limit "
                     f"{VMEM_LIMIT_BYTES / 2**20:.0f} MiB); use backend='xla'")
  # the locations and weights: one table of phi's rows, or the two arguments'; the scale's
  smem = ([pltpu.SMEM((cfg.logits, cfg.chunk_lanes), F32)] if cfg.phi else
          [pltpu.SMEM((cfg.logits // 2, cfg.block_l), F32)] * 2)
  smem += [pltpu.SMEM((cfg.heads, cfg.block_l), F32)] * cfg.scale
  scratch = scratch + smem + [pltpu.SemaphoreType.DMA((3,))]
  present = [a for a in args if a is not None]
  specs = [s for a, s in zip(args, in_specs) if a is not None]
  outs = out_shape if isinstance(out_shape, list) else [out_shape]
  nbytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in [*tables, *present, *outs])
  return pl.pallas_call(
      functools.partial(kernel, cfg), out_shape=out_shape,
      grid=(cfg.splits, cfg.per_split, cfg.n_chunks),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * len(tables) + specs,
      out_specs=out_specs, scratch_shapes=scratch, interpret=cfg.interpret, name=name,
      cost_estimate=pl.CostEstimate(**_work(cfg, backward), bytes_accessed=nbytes),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary"),
          vmem_limit_bytes=max(need * 5 // 4, 16 * 2**20) if need > 12 * 2**20 else None),
  )(*tables, *present)


def _work(cfg, backward):
  """What the kernel computes, for XLA's cost analysis: FLOPs (2 per multiply-add: the taps'
  rows times their weights, in the backward also their dots and dh's accumulation; phi's
  products over their lane windows, in the backward also dh's and d W's) and exps."""
  taps = 2 * cfg.batch * cfg.length * cfg.heads * cfg.points * 2 * cfg.channels
  phi = exps = 0
  if cfg.phi:
    positions = cfg.batch * cfg.n_chunks * cfg.chunk_lanes
    phi = 2 * positions * cfg.logits * cfg.route_window[0]
    exps = positions * cfg.logits
  return dict(flops=int((taps + phi) * (1 + 2 * backward)), transcendentals=int(exps))


def _name(cfg, direction):
  return ("learned_read_" if cfg.phi else "memory_read_") + direction


def _spec(cfg, block, index):
  """A block of the grid (split, image of the split, chunk) given by index(image, chunk)."""
  return pl.BlockSpec(block, lambda s, j, c: index(s * cfg.per_split + j, c))


def _ids(cfg):
  """The image and the chunk of this grid step."""
  return pl.program_id(0) * cfg.per_split + pl.program_id(1), pl.program_id(2)


def _specs(cfg):
  image = _spec(cfg, (None, cfg.length, cfg.width), lambda b, c: (b, 0, 0))
  chunk = _spec(cfg, (None, cfg.block_l, cfg.width), lambda b, c: (b, c, 0))
  row = _spec(cfg, (1, cfg.width), lambda b, c: (0, 0))
  return image, chunk, row


def _phi_specs(cfg):
  """W, b and reach: whole, the same block at every step."""
  whole = lambda *shape: _spec(cfg, shape, lambda b, c: (0,) * len(shape))
  return [whole(cfg.routes, cfg.route_rows, cfg.route_window[0]), whole(cfg.logits, 1),
          whole(cfg.logits // 2, 1)]


def _load_tables(cfg, hbm_refs, smem, sem):
  """The chunk's columns of the HBM tables -> SMEM; a ragged last chunk's from the tails."""
  b, c = _ids(cfg)
  hbm_refs, tails = hbm_refs[:cfg.n_tables], hbm_refs[cfg.n_tables:]
  smem = smem[1:] if cfg.phi else smem  # phi makes the locations and weights
  if not hbm_refs:
    return

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
  """The image as float32 rows that a dynamic index can address (bf16 rows are packed), with
  zero rows up to whole chunks when phi reads them."""
  if not cfg.copy:
    return h_ref

  @pl.when(_ids(cfg)[1] == 0)
  def _():
    hf_s[pl.ds(0, cfg.length), :] = h_ref[...].astype(F32)
    if cfg.rows > cfg.length:
      hf_s[pl.ds(cfg.length, cfg.rows - cfg.length), :] = jnp.zeros(
          (cfg.rows - cfg.length, cfg.width), F32)

  return hf_s


def _chunk_start(cfg):
  return 0 if cfg.n_chunks == 1 else pl.multiple_of(_ids(cfg)[1] * cfg.block_l, 128)


def _tap(cfg, tables_s, t, g, k):
  """Tap (g, k) of the chunk's position t: its two rows, their weights (scale not included);
  the rows and the fraction as `read.taps` gives them."""
  if cfg.phi:
    e = phi_pallas_tpu.row(cfg, g, k)
    p, wk = tables_s[0][e, t], tables_s[0][e + cfg.route_rows // 2, t]
  else:
    e = k * cfg.heads + g
    p, wk = tables_s[0][e, t], tables_s[1][e, t]
  floor = p.astype(jnp.int32)  # truncates: one less where that rounded a negative p up
  floor = jnp.where(floor.astype(F32) > p, floor - 1, floor)
  fk = p - floor.astype(F32)
  i0 = jnp.clip(floor, 0, cfg.length - 1)
  return i0, jnp.minimum(i0 + 1, cfg.length - 1), wk * (1.0 - fk), wk * fk


def _scale(cfg, tables_s, t, g):
  return tables_s[-1][g, t] if cfg.scale else None


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


def _split(cfg, refs, present):
  """The kernel's refs: HBM tables, inputs (None where `present` says absent), the rest."""
  n_tables = cfg.n_tables * (1 + cfg.ragged)
  tables, rest = refs[:n_tables], list(refs[n_tables:])
  return tables, [rest.pop(0) if p else None for p in present], rest


# ---------------------------------------------------------------------------------------------
# Forward.

def _forward(cfg, tables, h_BLW, gamma_row, phi=(None, None, None)):
  image, chunk, row = _specs(cfg)
  scratch = ([pltpu.VMEM((cfg.rows, cfg.width), F32)] if cfg.copy else []) + [
      pltpu.VMEM((cfg.block_l, cfg.width), F32)]
  if cfg.phi:
    scratch.append(pltpu.VMEM((cfg.logits, cfg.chunk_lanes), F32))
  return _call(cfg, _fwd_kernel, _name(cfg, "fwd"),
               jax.ShapeDtypeStruct(h_BLW.shape, h_BLW.dtype), [image, row] + _phi_specs(cfg),
               chunk, scratch, tables, [h_BLW, gamma_row, *phi], backward=False)


def _fwd_kernel(cfg, *refs):
  tables_hbm, (h_ref, gamma_ref, *phi_refs), rest = _split(
      cfg, refs, (True, cfg.gamma) + (cfg.phi,) * 3)
  o_ref, *rest = rest
  hf_s = rest.pop(0) if cfg.copy else None
  out_s = rest.pop(0)
  tab_v = rest.pop(0) if cfg.phi else None
  tables_s, sem = rest[:-1], rest[-1]
  hf = _image_f32(cfg, h_ref, hf_s)
  _load_tables(cfg, tables_hbm, tables_s, sem)
  if cfg.phi:
    phi_pallas_tpu.tables(cfg, hf, _chunk_start(cfg), phi_refs, tab_v, tables_s, sem)
  windows = _head_windows(cfg)
  first = _ids(cfg)[1] * cfg.block_l

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

def _backward(cfg, tables, h_BLW, dout_BLW, gamma_row, phi=(None, None, None)):
  """The kernel's outputs by name: dh; dots (memory_read: the chunk's dots, positions last;
  learned_read: d scale, when there is a scale); dgamma per split of the batch; learned_read:
  dw, db per split."""
  image, chunk, row = _specs(cfg)
  per_split = lambda *shape: (
      jax.ShapeDtypeStruct((cfg.splits, *shape), F32),
      pl.BlockSpec((None, *shape), lambda s, j, c: (s,) + (0,) * len(shape)))
  per_chunk = lambda rows, n: (jax.ShapeDtypeStruct((cfg.batch, rows, cfg.n_chunks * n), F32),
                               _spec(cfg, (None, rows, n), lambda b, c: (b, 0, c)))
  outs = {"dh": (jax.ShapeDtypeStruct(h_BLW.shape, h_BLW.dtype), image)}
  if not cfg.phi:
    outs["dots"] = per_chunk(cfg.dot_lanes, cfg.block_l)
  elif cfg.scale:
    outs["dots"] = per_chunk(cfg.heads, cfg.chunk_lanes)
  outs["dgamma"] = per_split(1, cfg.width)
  scratch = ([pltpu.VMEM((cfg.rows, cfg.width), F32)] if cfg.copy else []) + [
      pltpu.VMEM((cfg.rows, cfg.width), F32), pltpu.VMEM((cfg.block_l, cfg.width), F32),
      pltpu.VMEM(cfg.dots_tile, F32), pltpu.VMEM((1, cfg.width), F32)]
  if cfg.phi:
    w_shape = (cfg.routes, cfg.route_rows, cfg.route_window[0])
    outs["dw"], outs["db"] = per_split(*w_shape), per_split(cfg.logits, 1)
    scratch += [pltpu.VMEM((cfg.logits, cfg.chunk_lanes), F32),
                pltpu.VMEM((cfg.logits // 2, cfg.chunk_lanes), F32),
                pltpu.VMEM(w_shape, F32), pltpu.VMEM((cfg.logits, 1), F32)]
  shapes, specs = zip(*outs.values())
  got = _call(cfg, _bwd_kernel, _name(cfg, "bwd"), list(shapes),
              [image, chunk, row] + _phi_specs(cfg), list(specs), scratch, tables,
              [h_BLW, dout_BLW, gamma_row, *phi], backward=True)
  return dict(zip(outs, got))


def _bwd_kernel(cfg, *refs):
  tables_hbm, (h_ref, dout_ref, gamma_ref, *phi_refs), rest = _split(
      cfg, refs, (True, True, cfg.gamma) + (cfg.phi,) * 3)
  dh_ref = rest.pop(0)
  dots_ref = rest.pop(0) if not cfg.phi or cfg.scale else None
  dgamma_ref = rest.pop(0)
  dw_ref, db_ref = (rest.pop(0), rest.pop(0)) if cfg.phi else (None, None)
  hf_s = rest.pop(0) if cfg.copy else None
  dh_s, dout_s, dots_s, dgamma_s = rest[:4]
  rest = rest[4:]
  phi_s = rest[:4] if cfg.phi else None  # tables, reach factors, d W, d b
  rest = rest[4 * cfg.phi:]
  tables_s, sem = rest[:-1], rest[-1]
  j, c = pl.program_id(1), _ids(cfg)[1]
  hf = _image_f32(cfg, h_ref, hf_s)
  _load_tables(cfg, tables_hbm, tables_s, sem)
  if cfg.phi:
    phi_pallas_tpu.tables(cfg, hf, _chunk_start(cfg), phi_refs, phi_s[0], tables_s, sem,
                          fac_v=phi_s[1])
  windows = _head_windows(cfg)

  @pl.when(c == 0)
  def _():
    dh_s[...] = jnp.zeros_like(dh_s)

  @pl.when((j == 0) & (c == 0))  # the split's sums
  def _():
    for acc in [dgamma_s] + (phi_s[2:] if cfg.phi else []):
      acc[...] = jnp.zeros_like(acc)

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
      d_read = e if sc is None else sc * e
      read = jnp.zeros((1, stop - start), F32)
      for k in range(K):
        i0, i1, w0, w1 = _tap(cfg, tables_s, t, g, k)
        r0, r1 = hf[pl.ds(i0, 1), start:stop], hf[pl.ds(i1, 1), start:stop]
        lane0, lane1 = _dot_lanes(cfg, g, k)
        dots = jnp.where(lane == lane0, jnp.sum(r0 * d_read, axis=1, keepdims=True), dots)
        dots = jnp.where(lane == lane1, jnp.sum(r1 * d_read, axis=1, keepdims=True), dots)
        dh_s[pl.ds(i0, 1), start:stop] += w0 * d_read
        dh_s[pl.ds(i1, 1), start:stop] += w1 * d_read
        if cfg.gamma or cfg.scale:
          read = read + w0 * r0 + w1 * r1
      d_scale = jnp.sum(read * e, axis=1, keepdims=True)  # <h', d out> = <read, e> + <h, d out>
      if cfg.gamma:  # h' = h + gamma read: the residual path, d gamma, and <h, d out>
        d_g = jnp.where(mask, d[:, start:stop], 0.0)
        sd = d_g if sc is None else sc * d_g
        dh_s[pl.ds(own, 1), start:stop] += sd
        dgamma_s[:, start:stop] += sd * read
        d_scale += jnp.sum(hf[pl.ds(own, 1), start:stop] * d_g, axis=1, keepdims=True)
      if cfg.scale:
        dots = jnp.where(lane == 2 * G * K + g, d_scale, dots)
    dots_s[pl.ds(t, 1), :] = dots
    return carry

  jax.lax.fori_loop(0, cfg.block_l, position, 0)
  dots = dots_s[...].T  # positions last
  if not cfg.phi:
    dots_ref[...] = dots[:cfg.dot_lanes, :cfg.block_l]
  else:
    valid = jax.lax.broadcasted_iota(jnp.int32, (1, cfg.chunk_lanes), 1) < lim
    if cfg.scale:
      dots_ref[...] = jnp.where(valid, dots[2 * G * K:2 * G * K + G], 0.0)
    phi_pallas_tpu.backward(cfg, hf, _chunk_start(cfg), phi_refs[0], phi_s, dh_s,
                            jnp.where(valid, dots[:2 * G * K], 0.0))

  @pl.when(c == cfg.n_chunks - 1)
  def _():
    dh_ref[...] = dh_s[pl.ds(0, cfg.length), :].astype(dh_ref.dtype)

  @pl.when((j == cfg.per_split - 1) & (c == cfg.n_chunks - 1))
  def _():
    dgamma_ref[...] = dgamma_s[...]
    if cfg.phi:
      dw_ref[...] = phi_s[2][...]
      db_ref[...] = phi_s[3][...]


def _dot_lanes(cfg, g, k):
  """The lanes of <h[p0], d read> and <h[p1], d read> of head g's tap k in a position's dots:
  (row, point, head) for memory_read, in the rows of phi's table (location and weight rows)
  for learned_read."""
  if cfg.phi:
    e = phi_pallas_tpu.row(cfg, g, k)
    return e, e + cfg.route_rows // 2
  return k * cfg.heads + g, cfg.heads * cfg.points + k * cfg.heads + g
