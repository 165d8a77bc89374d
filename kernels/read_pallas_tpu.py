"""Pallas TPU (Mosaic) kernels of `memory_read` (kernels/read.py) and of `learned_read`
(kernels/learned.py), each under one custom_vjp.

XLA:TPU makes a serial loop of the scatter-add in the read's backward and moves whole (8, 128)
tiles for each gathered row of C channels (what that costs: benchmarks/README.md). Here the
rows never leave VMEM, and gamma and scale are applied inside the kernels: neither the read nor
h' is written to HBM, in either direction.

Layout: h as it comes, (batch, L, G x C) with the G heads side by side in the lanes (no
transpose, and no padding of a head's C channels to 128 lanes). Both kernels run on a grid
(split, image, L chunk): two halves of the batch (a megacore chip's two cores; one half for an
odd batch), then their images and chunks in sequence. The image's whole sequence h[b]
(L, G x C) stays in VMEM across its chunks, once, as float32 rows: h itself stays in HBM and the
kernel copies the image in at its first chunk (a bf16 one slab by slab through a small staging
buffer, each slab cast), so neither a pipelined block of h (two buffers) nor a second,
uncast copy of it takes VMEM; the backward's dh goes out the same way from its float32
accumulator. Per chunk, its positions' tables sit in SMEM, where the scalar unit reads them:
the location and weight of every (point, head), and the scale of every head. Each comes
positions last, (rows, chunk), and is one of:
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import phi_pallas_tpu
from kernels.common import F32, taps

# The most VMEM a kernel may take: 120 of a v5e's (and v6e's) 128 MiB, or less on a chip with
# less (libtpu's figures per TensorCore: v5p 64 MiB, v4 16 MiB) when it is known while tracing
# (vmem_limit). Above Mosaic's 16 MiB default when the whole image needs it.
VMEM_LIMIT_BYTES = 120 * 2**20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """The read's blocks on TPU; a size left None is chosen for the shape (`for_shape`).

  block_l: positions per chunk (grid step), L or a multiple of 128 (a chunk's table columns
    start at a whole lane tile). Default 128 (benchmarks/README.md: the bytes of 32, 128 and
    256). The chunk's tables sit in SMEM: 2 x block_l x G x K words, and block_l x G for the
    scale.
  """
  block_l: int | None = None

  def for_shape(self, length):
    """These sizes, each None chosen for the shape; ValueError naming one that does not fit."""
    block_l = length if (self.block_l or 128) >= length else (self.block_l or 128)
    if block_l != length and block_l % 128:
      raise ValueError(f"block_l={block_l} must be a multiple of 128 (or at least L={length})")
    return BlockSizes(block_l)


class Tables(NamedTuple):
  """The per-position tables of a chunk, positions last; None where absent. From HBM: the
  arguments (memory_read's pos and weight (batch, K G, L), the scale (batch, G, L)). In SMEM:
  their chunk's columns, or learned_read's one table of phi's rows (locations and weights, in
  `pos`, weight None) and the scale's columns."""
  pos: Any
  weight: Any
  scale: Any


@dataclasses.dataclass(frozen=True)
class ReadConfig:
  """What a read kernel (memory_read's or learned_read's, forward or backward) is specialised
  to: the shape, the block size (filled in and validated), which optional inputs it has."""
  length: int  # L
  heads: int  # G
  channels: int  # C per head
  points: int  # K
  block_l: int  # positions per chunk
  cast: bool  # h is not float32: its rows are cast to the float32 image in VMEM
  has_gamma: bool  # out = h + gamma * read (else the read)
  has_scale: bool  # out *= scale
  interpret: Any  # False, or the Pallas interpreter's parameters
  has_phi: bool = False  # learned_read: the locations and weights from phi's product of h
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
    return 2 * (not self.has_phi) + self.has_scale  # them, the scale when there is one

  @property
  def width(self):  # G x C lanes
    return self.heads * self.channels

  @property
  def chunk_lanes(self):  # a chunk's positions in whole lane tiles
    return pl.cdiv(self.block_l, 128) * 128

  @property
  def rows(self):  # the image's rows in VMEM: whole chunks of chunk_lanes when phi reads them
    return self.n_chunks * self.chunk_lanes if self.has_phi else self.length

  @property
  def copy(self):  # h and dh move HBM <-> VMEM through staging slabs: cast, or the image
    return self.cast or self.rows != self.length  # padded with zero rows

  @property
  def slabs(self):
    """(rows, count, tail): the staging slab's rows (a multiple of 32, at most 1 MiB of the
    float32 image), the number of whole slabs in L, and the rows of the last, partial one."""
    rows = min(self.length, max(32, 2**20 // (4 * self.width) // 32 * 32))
    return rows, self.length // rows, self.length % rows

  @property
  def logits(self):  # phi's outputs per position: (location or weight, point, head)
    return 2 * self.points * self.heads

  @property
  def dots_tile(self):  # the backward's dots of a chunk, one row per position, in whole tiles
    return self.chunk_lanes, pl.cdiv(self.dot_lanes, 128) * 128

  @property
  def dot_lanes(self):  # per position: e0 and e1 of every (point, head), then d scale per head
    return 2 * self.heads * self.points + self.heads


def _config(h, points, gamma, scale, block_sizes, interpret, routes=None):
  batch, length, groups, C = h.shape
  block_l = (block_sizes or BlockSizes()).for_shape(length).block_l
  return ReadConfig(length, groups, C, points, block_l, h.dtype != F32, gamma is not None,
                    scale is not None, interpret, routes is not None, batch, routes or 1)


# ---------------------------------------------------------------------------------------------
# memory_read: the tables given.

def read(h, pos, weight, gamma=None, scale=None, *, interpret=False, block_sizes=None):
  """memory_read on TPU: h (batch, L, G, C), pos and weight (batch, K, G, L) float32, gamma
  (G, C) or None, scale (batch, G, L) or None. block_sizes: a BlockSizes (None: chosen for the
  shape). interpret: False, or the Pallas TPU interpreter's parameters (any platform)."""
  cfg = _config(h, pos.shape[1], gamma, scale, block_sizes, interpret)
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

def learned(h, w, b, reach, gamma=None, scale=None, *, interpret=False, block_sizes=None):
  """learned_read on TPU (kernels/learned.py's contract): h (batch, L, G, C); w (R, S C, 2 K S)
  and b (R, 2 K S), each route's phi; reach (G,) float32; gamma (G, C) or None; scale
  (batch, G, L) or None. block_sizes, interpret: as `read`'s."""
  R, D, J = w.shape
  cfg = _config(h, J * R // (2 * h.shape[2]), gamma, scale, block_sizes, interpret, routes=R)
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
  SMEM. Returns (tables, tails): when L is not a multiple of block_l the tails are each table's
  last chunk, padded to block_l columns (location 0, weight 0) (Mosaic copies no part of a row
  of 128-lane tiles to SMEM), else None."""
  by_point = lambda x: None if x is None else x.reshape(x.shape[0], -1, x.shape[-1])
  tables = Tables(by_point(pos), by_point(weight), None if scale is None else scale.astype(F32))
  if not cfg.ragged:
    return tables, None
  start, pad = (cfg.n_chunks - 1) * cfg.block_l, cfg.n_chunks * cfg.block_l - cfg.length
  return tables, jax.tree.map(lambda t: jnp.pad(t[:, :, start:], [(0, 0), (0, 0), (0, pad)]),
                              tables)


def vmem_limit():
  """The VMEM a kernel may take: VMEM_LIMIT_BYTES, or 15/16 of the chip's VMEM per TensorCore
  where that is less and the chip is known while tracing (the context's mesh, e.g. the train
  step's, or the default device is a TPU): v5p 60 MiB, v4 15 MiB."""
  try:
    if pltpu.is_tpu_device():
      return min(VMEM_LIMIT_BYTES, pltpu.get_tpu_info().vmem_capacity_bytes * 15 // 16)
  except (ValueError, NotImplementedError):  # a TPU that this jax does not describe
    pass
  return VMEM_LIMIT_BYTES


def fits(op, h, *args, backward):
  """Whether `op`'s forward (or backward) kernel ("memory_read": args pos, weight, gamma, scale;
  "learned_read": w, b, reach, gamma, scale) takes one image of h (batch, L, G, C) within
  vmem_limit(): the rule of backend "auto" on TPU (kernels/read.py)."""
  gamma, scale = args[-2:]
  if op == "memory_read":
    cfg = _config(h, args[0].shape[1], gamma, scale, None, False)
  else:
    R, _, J = args[0].shape
    cfg = _config(h, J * R // (2 * h.shape[2]), gamma, scale, None, False, routes=R)
  return _vmem_bytes(cfg, jnp.dtype(h.dtype).itemsize, backward) <= vmem_limit()


def _vmem_bytes(cfg, itemsize, backward):
  """VMEM of the kernel's blocks and scratch in Mosaic's tiles (8 rows of 32-bit words, 16 of
  16-bit ones, by 128 lanes). A block is double-buffered unless every grid step takes the same
  one (gamma, W, b, reach: one buffer). h and dh stay in HBM (memory space ANY): the kernel
  moves them (through the staging slabs when cfg.copy), so the image is in VMEM once as float32
  rows (and once more for dh's accumulator in the backward)."""
  def pad(rows, lanes, size=4):
    tile = 8 * 4 // size
    return pl.cdiv(rows, tile) * tile * pl.cdiv(lanes, 128) * 128 * size
  image, chunk = pad(cfg.rows, cfg.width), pad(cfg.chunk_lanes, cfg.width)
  slab, _, tail = cfg.slabs
  staging = cfg.copy * (pad(slab, cfg.width, itemsize) + (tail > 0) * pad(tail, cfg.width,
                                                                          itemsize))
  chunk_in = pad(cfg.block_l, cfg.width, itemsize)
  row = pad(1, cfg.width)
  phi = 0
  if cfg.has_phi:  # W, b and reach blocks; the tables and phi's product of a chunk; in the
    # backward also d W and d b (blocks and scratch), the reach factors and d logits
    w, col = pad(cfg.logits, cfg.route_window[0]), pad(cfg.logits, 1)
    tables = pad(cfg.logits, cfg.chunk_lanes)
    phi = w + 2 * col + 2 * tables + backward * (3 * (w + col) + 2 * tables + chunk)
  if backward:  # the d out chunk, dots and d gamma blocks, the gamma row; the float32 image,
    # dh, d out, dots and d gamma scratch
    dots = pad(cfg.dot_lanes, cfg.chunk_lanes)
    return (2 * (chunk_in + dots + row) + row + 2 * image + staging + chunk
            + pad(*cfg.dots_tile) + row + phi)
  return 2 * chunk_in + row + image + staging + chunk + phi


def _call(cfg, kernel, name, out_shape, in_specs, out_specs, scratch, tables, args, backward):
  """The pallas_call over (split, image, chunk): `tables` the HBM (tables, tails), `args` the
  other inputs, an absent one None (and its ref in the kernel); the kernel's SMEM tables and
  DMA semaphores are added after `scratch`. Refuses in one line an image that does not fit
  vmem_limit(); states the kernel's cost to XLA."""
  need, limit = _vmem_bytes(cfg, args[0].dtype.itemsize, backward), vmem_limit()
  if need > limit:
    raise ValueError(f"{name.rsplit('_', 1)[0]} pallas_tpu: an image of L={cfg.length} x "
                     f"G*C={cfg.width} needs {need / 2**20:.0f} MiB of VMEM (limit "
                     f"{limit / 2**20:.0f} MiB); use backend='xla'")
  # the locations and weights: one table of phi's rows, or the two arguments'; the scale's
  per_point = pltpu.SMEM((cfg.logits // 2, cfg.block_l), F32)
  tables_s = Tables(pltpu.SMEM((cfg.logits, cfg.chunk_lanes), F32) if cfg.has_phi else per_point,
                    None if cfg.has_phi else per_point,
                    pltpu.SMEM((cfg.heads, cfg.block_l), F32) if cfg.has_scale else None)
  scratch = [*scratch, tables_s, pltpu.SemaphoreType.DMA((3,))]  # tables (and image) copies
  nbytes = sum(math.prod(x.shape) * x.dtype.itemsize
               for x in jax.tree.leaves([tables, args, out_shape]))
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
      functools.partial(kernel, cfg=cfg), out_shape=out_shape,
      grid=(cfg.splits, cfg.per_split, cfg.n_chunks),
      in_specs=[*jax.tree.map(lambda _: hbm, tables), *in_specs],
      out_specs=out_specs, scratch_shapes=scratch, interpret=cfg.interpret, name=name,
      cost_estimate=pl.CostEstimate(**_work(cfg, backward), bytes_accessed=nbytes),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary"),
          vmem_limit_bytes=min(max(need * 5 // 4, 16 * 2**20), max(limit, 16 * 2**20))
          if need > 12 * 2**20 else None),
  )(*tables, *args)


def _work(cfg, backward):
  """What the kernel computes, for XLA's cost analysis: FLOPs (2 per multiply-add: the taps'
  rows times their weights, in the backward also their dots and dh's accumulation; phi's
  products over their lane windows, in the backward also dh's and d W's) and exps."""
  taps = 2 * cfg.batch * cfg.length * cfg.heads * cfg.points * 2 * cfg.channels
  phi = exps = 0
  if cfg.has_phi:
    positions = cfg.batch * cfg.n_chunks * cfg.chunk_lanes
    phi = 2 * positions * cfg.logits * cfg.route_window[0]
    exps = positions * cfg.logits
  return dict(flops=int((taps + phi) * (1 + 2 * backward)), transcendentals=int(exps))


def _name(cfg, direction):
  return ("learned_read_" if cfg.has_phi else "memory_read_") + direction


def _spec(cfg, block, index):
  """A block of the grid (split, image of the split, chunk) given by index(image, chunk)."""
  return pl.BlockSpec(block, lambda s, j, c: index(s * cfg.per_split + j, c))


def _ids(cfg):
  """The image and the chunk of this grid step."""
  return pl.program_id(0) * cfg.per_split + pl.program_id(1), pl.program_id(2)


def _specs(cfg):
  image = pl.BlockSpec(memory_space=pl.ANY)  # h, dh: the kernel moves them (_image_f32, _put_dh)
  chunk = _spec(cfg, (None, cfg.block_l, cfg.width), lambda b, c: (b, c, 0))
  row = _spec(cfg, (1, cfg.width), lambda b, c: (0, 0))
  return image, chunk, row


def _phi_specs(cfg):
  """W, b and reach: whole, the same block at every step (None for memory_read)."""
  if not cfg.has_phi:
    return [None] * 3
  whole = lambda *shape: _spec(cfg, shape, lambda b, c: (0,) * len(shape))
  return [whole(cfg.routes, cfg.route_rows, cfg.route_window[0]), whole(cfg.logits, 1),
          whole(cfg.logits // 2, 1)]


def _load_tables(cfg, tables_hbm, tails_hbm, tables_s, sem):
  """The chunk's columns of the HBM tables -> their SMEM tables; a ragged last chunk's from
  the tails. (learned_read's locations and weights are made in VMEM: phi_pallas_tpu.tables.)"""
  b, c = _ids(cfg)
  tails_hbm = tails_hbm or Tables(None, None, None)
  moves = [(src, tail, dst) for src, tail, dst in zip(tables_hbm, tails_hbm, tables_s)
           if src is not None]
  if not moves:
    return

  def copy(srcs):
    copies = [pltpu.make_async_copy(src, dst, sem.at[i])
              for i, (src, (_, _, dst)) in enumerate(zip(srcs, moves))]
    for cp in copies:
      cp.start()
    for cp in copies:
      cp.wait()

  if cfg.n_chunks == 1:
    copy([src.at[b] for src, _, _ in moves])
    return
  bl = cfg.block_l  # a multiple of 128
  whole = lambda: copy([src.at[b, :, pl.ds(pl.multiple_of(c * bl, bl), bl)]
                        for src, _, _ in moves])
  if not cfg.ragged:
    whole()
    return
  pl.when(c < cfg.n_chunks - 1)(whole)
  pl.when(c == cfg.n_chunks - 1)(lambda: copy([tail.at[b] for _, tail, _ in moves]))


def _image_f32(cfg, h_hbm, hf_s, stage, sem):
  """At the image's first chunk, its rows h[b] from HBM into hf_s: float32 rows that a dynamic
  index can address (bf16 rows are packed), with zero rows up to whole chunks when phi reads
  them. A float32 image of L rows is copied whole; else slab by slab through `stage` (h's
  dtype), each cast into hf_s. The image is in VMEM once (a block of h would be twice, the
  pipeline's two buffers, and a cast image a third time)."""
  b = _ids(cfg)[0]

  @pl.when(_ids(cfg)[1] == 0)
  def _():
    if not cfg.copy:
      _dma(h_hbm.at[b], hf_s, sem)
      return

    def get(rows, buf):
      _dma(h_hbm.at[b, rows], buf, sem)
      hf_s[rows, :] = buf[...].astype(F32)

    _by_slabs(cfg, stage, get)
    if cfg.rows > cfg.length:
      hf_s[pl.ds(cfg.length, cfg.rows - cfg.length), :] = jnp.zeros(
          (cfg.rows - cfg.length, cfg.width), F32)

  return hf_s


def _put_dh(cfg, dh_s, dh_hbm, stage, sem):
  """The image's dh (float32 rows of dh_s) to HBM: whole, or slab by slab cast into `stage`
  (dh's dtype), as _image_f32 brought h in."""
  b = _ids(cfg)[0]
  if not cfg.copy:
    _dma(dh_s, dh_hbm.at[b], sem)
    return

  def put(rows, buf):
    buf[...] = dh_s[rows, :].astype(buf.dtype)
    _dma(buf, dh_hbm.at[b, rows], sem)

  _by_slabs(cfg, stage, put)


def _by_slabs(cfg, stage, move):
  """move(rows, buffer) for the image's whole slabs of rows (a loop), then its partial last
  one (static), each with its staging buffer."""
  rows, count, tail = cfg.slabs

  def whole(i, carry):
    move(pl.ds(pl.multiple_of(i * rows, 32), rows), stage[0])
    return carry

  if count == 1:
    move(pl.ds(0, rows), stage[0])
  else:
    jax.lax.fori_loop(0, count, whole, 0)
  if tail:
    move(pl.ds(count * rows, tail), stage[1])


def _dma(src, dst, sem):
  """A copy HBM <-> VMEM, waited on (the tables' semaphore 0: every copy is waited on)."""
  cp = pltpu.make_async_copy(src, dst, sem.at[0])
  cp.start()
  cp.wait()


def _staging(cfg, dtype):
  """The staging slabs of h's dtype when cfg.copy (else None): a whole one and, where L ends in
  a partial one, one of its rows (else None)."""
  if not cfg.copy:
    return None
  rows, _, tail = cfg.slabs
  return (pltpu.VMEM((rows, cfg.width), dtype),
          pltpu.VMEM((tail, cfg.width), dtype) if tail else None)


def _chunk_start(cfg):
  return 0 if cfg.n_chunks == 1 else pl.multiple_of(_ids(cfg)[1] * cfg.block_l, 128)


def _tap(cfg, tables_s, t, g, k):
  """Tap (g, k) of the chunk's position t: its two rows, their weights (scale not included);
  the rows and the fraction as `read.taps` gives them."""
  if cfg.has_phi:
    e = phi_pallas_tpu.row(cfg, g, k)
    p, wk = tables_s.pos[e, t], tables_s.pos[e + cfg.route_rows // 2, t]
  else:
    e = k * cfg.heads + g
    p, wk = tables_s.pos[e, t], tables_s.weight[e, t]
  floor = p.astype(jnp.int32)  # truncates: one less where that rounded a negative p up
  floor = jnp.where(floor.astype(F32) > p, floor - 1, floor)
  fk = p - floor.astype(F32)
  i0 = jnp.clip(floor, 0, cfg.length - 1)
  return i0, jnp.minimum(i0 + 1, cfg.length - 1), wk * (1.0 - fk), wk * fk


def _scale(cfg, tables_s, t, g):
  return tables_s.scale[g, t] if cfg.has_scale else None


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

def _forward(cfg, tables, h_BLW, gamma_row, phi=(None, None, None)):
  image, chunk, row = _specs(cfg)
  scratch = [pltpu.VMEM((cfg.rows, cfg.width), F32), pltpu.VMEM((cfg.block_l, cfg.width), F32),
             pltpu.VMEM((cfg.logits, cfg.chunk_lanes), F32) if cfg.has_phi else None,
             _staging(cfg, h_BLW.dtype)]
  return _call(cfg, _fwd_kernel, _name(cfg, "fwd"),
               jax.ShapeDtypeStruct(h_BLW.shape, h_BLW.dtype),
               [image, row if cfg.has_gamma else None, *_phi_specs(cfg)], chunk, scratch,
               tables, [h_BLW, gamma_row, *phi], backward=False)


def _fwd_kernel(tables_hbm, tails_hbm,  # the HBM tables (Tables), a ragged chunk's (or None)
                h_ref, gamma_ref, w_ref, b_ref, reach_ref,  # inputs (h in HBM; phi's: learned)
                o_ref,  # output: a chunk of out
                hf_s, out_s, tab_s, stage_s,  # scratch: image, out chunk, phi's table, staging
                tables_s, sem,  # SMEM tables, DMA semaphores
                *, cfg):
  hf = _image_f32(cfg, h_ref, hf_s, stage_s, sem)
  _load_tables(cfg, tables_hbm, tails_hbm, tables_s, sem)
  if cfg.has_phi:
    phi_pallas_tpu.tables(cfg, hf, _chunk_start(cfg), w_ref, b_ref, reach_ref, tab_s,
                          tables_s.pos, sem)
  windows = _head_windows(cfg)
  first = _ids(cfg)[1] * cfg.block_l

  def position(t, carry):
    own = jnp.minimum(first + t, cfg.length - 1)  # this position's row (clamped past L)
    for g, (start, stop, mask) in enumerate(windows):
      acc = jnp.zeros((1, stop - start), F32)
      for k in range(cfg.points):
        i0, i1, w0, w1 = _tap(cfg, tables_s, t, g, k)
        acc = acc + w0 * hf[pl.ds(i0, 1), start:stop] + w1 * hf[pl.ds(i1, 1), start:stop]
      if cfg.has_gamma:
        acc = hf[pl.ds(own, 1), start:stop] + gamma_ref[:, start:stop] * acc
      if cfg.has_scale:
        acc = _scale(cfg, tables_s, t, g) * acc
      out_s[pl.ds(t, 1), start:stop] = jnp.where(mask, acc, out_s[pl.ds(t, 1), start:stop])
    return carry

  jax.lax.fori_loop(0, cfg.block_l, position, 0)
  o_ref[...] = out_s[...].astype(o_ref.dtype)


# ---------------------------------------------------------------------------------------------
# Backward.

def _backward(cfg, tables, h_BLW, dout_BLW, gamma_row, phi=(None, None, None)):
  """The kernel's outputs by name: dh; dots (memory_read: the chunk's dots, positions last;
  learned_read: d scale, when there is a scale; else None); dgamma per split of the batch;
  learned_read: dw, db per split (else None)."""
  image, chunk, row = _specs(cfg)
  per_split = lambda *shape: (
      jax.ShapeDtypeStruct((cfg.splits, *shape), F32),
      pl.BlockSpec((None, *shape), lambda s, j, c: (s,) + (0,) * len(shape)))
  per_chunk = lambda rows, n: (jax.ShapeDtypeStruct((cfg.batch, rows, cfg.n_chunks * n), F32),
                               _spec(cfg, (None, rows, n), lambda b, c: (b, 0, c)))
  absent = (None, None)
  w_shape = (cfg.routes, cfg.route_rows, cfg.route_window[0])
  outs = dict(
      dh=(jax.ShapeDtypeStruct(h_BLW.shape, h_BLW.dtype), image),
      dots=(per_chunk(cfg.dot_lanes, cfg.block_l) if not cfg.has_phi else
            per_chunk(cfg.heads, cfg.chunk_lanes) if cfg.has_scale else absent),
      dgamma=per_split(1, cfg.width),
      dw=per_split(*w_shape) if cfg.has_phi else absent,
      db=per_split(cfg.logits, 1) if cfg.has_phi else absent)
  phi_scratch = lambda *shape: pltpu.VMEM(shape, F32) if cfg.has_phi else None
  scratch = [
      pltpu.VMEM((cfg.rows, cfg.width), F32), pltpu.VMEM((cfg.rows, cfg.width), F32),
      pltpu.VMEM((cfg.block_l, cfg.width), F32),
      pltpu.VMEM(cfg.dots_tile, F32), pltpu.VMEM((1, cfg.width), F32),
      phi_scratch(cfg.logits, cfg.chunk_lanes), phi_scratch(cfg.logits // 2, cfg.chunk_lanes),
      phi_scratch(*w_shape), phi_scratch(cfg.logits, 1),
      _staging(cfg, h_BLW.dtype)]  # h in, then dh out
  shapes, specs = zip(*outs.values())
  got = _call(cfg, _bwd_kernel, _name(cfg, "bwd"), list(shapes),
              [image, chunk, row if cfg.has_gamma else None, *_phi_specs(cfg)], list(specs),
              scratch, tables, [h_BLW, dout_BLW, gamma_row, *phi], backward=True)
  return dict(zip(outs, got))


def _bwd_kernel(tables_hbm, tails_hbm,  # the HBM tables (Tables), a ragged chunk's (or None)
                h_ref, dout_ref, gamma_ref, w_ref, b_ref, reach_ref,  # inputs
                dh_ref, dots_ref, dgamma_ref, dw_ref, db_ref,  # outputs (see _backward)
                hf_s, dh_s, dout_s, dots_s, dgamma_s,  # scratch: image, dh, d out, dots, d gamma
                tab_s, fac_s, dw_s, db_s,  # scratch, learned_read: phi's table, reach factors,
                stage_s, tables_s, sem,  # d W, d b; staging; SMEM tables; DMA semaphores
                *, cfg):
  j, c = pl.program_id(1), _ids(cfg)[1]
  hf = _image_f32(cfg, h_ref, hf_s, stage_s, sem)
  _load_tables(cfg, tables_hbm, tails_hbm, tables_s, sem)
  if cfg.has_phi:
    phi_pallas_tpu.tables(cfg, hf, _chunk_start(cfg), w_ref, b_ref, reach_ref, tab_s,
                          tables_s.pos, sem, fac_s=fac_s)
  windows = _head_windows(cfg)

  @pl.when(c == 0)
  def _():
    dh_s[...] = jnp.zeros_like(dh_s)

  @pl.when((j == 0) & (c == 0))  # the split's sums
  def _():
    for acc in [dgamma_s] + ([dw_s, db_s] if cfg.has_phi else []):
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
    e_row = d * gamma_ref[...] if cfg.has_gamma else d  # d read = scale * e
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
        if cfg.has_gamma or cfg.has_scale:
          read = read + w0 * r0 + w1 * r1
      d_scale = jnp.sum(read * e, axis=1, keepdims=True)  # <h', d out> = <read, e> + <h, d out>
      if cfg.has_gamma:  # h' = h + gamma read: the residual path, d gamma, and <h, d out>
        d_g = jnp.where(mask, d[:, start:stop], 0.0)
        sd = d_g if sc is None else sc * d_g
        dh_s[pl.ds(own, 1), start:stop] += sd
        dgamma_s[:, start:stop] += sd * read
        d_scale += jnp.sum(hf[pl.ds(own, 1), start:stop] * d_g, axis=1, keepdims=True)
      if cfg.has_scale:
        dots = jnp.where(lane == 2 * G * K + g, d_scale, dots)
    dots_s[pl.ds(t, 1), :] = dots
    return carry

  jax.lax.fori_loop(0, cfg.block_l, position, 0)
  dots = dots_s[...].T  # positions last
  if not cfg.has_phi:
    dots_ref[...] = dots[:cfg.dot_lanes, :cfg.block_l]
  else:
    valid = jax.lax.broadcasted_iota(jnp.int32, (1, cfg.chunk_lanes), 1) < lim
    if cfg.has_scale:
      dots_ref[...] = jnp.where(valid, dots[2 * G * K:2 * G * K + G], 0.0)
    phi_pallas_tpu.backward(cfg, hf, _chunk_start(cfg), w_ref, tab_s, fac_s, dw_s, db_s, dh_s,
                            jnp.where(valid, dots[:2 * G * K], 0.0))

  @pl.when(c == cfg.n_chunks - 1)
  def _():
    _put_dh(cfg, dh_s, dh_ref, stage_s, sem)

  @pl.when((j == cfg.per_split - 1) & (c == cfg.n_chunks - 1))
  def _():
    dgamma_ref[...] = dgamma_s[...]
    if cfg.has_phi:
      dw_ref[...] = dw_s[...]
      db_ref[...] = db_s[...]


def _dot_lanes(cfg, g, k):
  """The lanes of <h[p0], d read> and <h[p1], d read> of head g's tap k in a position's dots:
  (row, point, head) for memory_read, in the rows of phi's table (location and weight rows)
  for learned_read."""
  if cfg.has_phi:
    e = phi_pallas_tpu.row(cfg, g, k)
    return e, e + cfg.route_rows // 2
  return k * cfg.heads + g, cfg.heads * cfg.points + k * cfg.heads + g
