"""learned_read's phi inside the read's Mosaic kernels (read_pallas_tpu.py runs them): the
locations and weights of a chunk of positions from phi's product of its rows of h, and, in the
backward kernel, the chunk's dots taken back through the softmax, clip and sigmoid and through
phi's two products. Everything here runs in VMEM on one chunk; `cfg` is the kernels'
read_pallas_tpu.ReadConfig and `first` the chunk's first row.

Phi is one product per route, W_r (2 K S, window) . h[chunk, window]^T over the whole lane tiles
that hold the route's D channels (1.33x the route's FLOPs for D = 192, where one product with a
dense (2 K G, G C) W took 4x); its table rows are route-major, (route, location or weight,
point, head of the route), as b has them; the softmax over the points combines sublane rolls
within a route's rows. The table is copied VMEM -> SMEM for the scalar unit.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.common import F32

HIGHEST = jax.lax.Precision.HIGHEST


def args(cfg, w, b, reach, dtype):
  """Each route's W in its lane window (R, 2 K S, window) in h's dtype (the MXU's operands, as
  XLA's product of h would have them); b as a column (R 2 K S, 1), phi's rows route-major
  as b has them; the reach of each location row (r, k, s) as a column (K G, 1)."""
  R, K, S = cfg.routes, cfg.points, cfg.heads // cfg.routes
  reach_rows = jnp.broadcast_to(reach.astype(F32).reshape(R, 1, S), (R, K, S))
  return w.astype(dtype), b.astype(F32).reshape(cfg.logits, 1), reach_rows.reshape(R * K * S, 1)


def tables(cfg, hf, first, w_ref, b_ref, reach_ref, tab_s, table_smem, sem, fac_s=None):
  """The chunk's locations and weights from phi's product of its rows of h (from row `first`),
  route by route: tab_s (2 K G, chunk_lanes) in VMEM, rows (route, location or weight, point,
  head of the route), copied to table_smem; fac_s (K G, chunk_lanes), rows (route, point,
  head), when given: d location / d logit (the reach times the sigmoid's derivative, 0 where
  the clip holds)."""
  n, KS, S = cfg.chunk_lanes, cfg.route_rows // 2, cfg.heads // cfg.routes
  width, starts = cfg.route_window
  i = (first + jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)).astype(F32)
  for r, a in enumerate(starts):
    rows = pl.ds(r * 2 * KS, 2 * KS)
    logits = product(w_ref[r], hf[pl.ds(first, n), a:a + width], 1, 1, w_ref.dtype)
    logits = logits + b_ref[rows, :]
    move = 1.0 / (1.0 + jnp.exp(-logits[:KS]))
    reach = reach_ref[pl.ds(r * KS, KS), :]
    x = i + reach * move
    tab_s[pl.ds(r * 2 * KS, KS), :] = jnp.clip(x, 0.0, cfg.length - 1.0)
    weights = logits[KS:]  # softmax over the points: rows k S + s, k's peers S rows apart
    ex = jnp.exp(weights - over_points(cfg, weights, jnp.maximum))
    tab_s[pl.ds(r * 2 * KS + KS, KS), :] = ex / over_points(cfg, ex, jnp.add)
    if fac_s is not None:
      inside = (x > 0.0) & (x < cfg.length - 1.0)
      fac_s[pl.ds(r * KS, KS), :] = jnp.where(inside, reach * move * (1.0 - move), 0.0)
  copy = pltpu.make_async_copy(tab_s, table_smem, sem.at[0])
  copy.start()
  copy.wait()


def over_points(cfg, x, op):
  """op over the K points of each head of a route's (K S, lanes) rows (k S + s), in every row:
  the rows rolled by S, 2S, ... combined."""
  S = cfg.heads // cfg.routes
  out = x
  for k in range(1, cfg.points):
    out = op(out, pltpu.roll(x, k * S, 0))
  return out


def row(cfg, g, k):
  """The table row of head g's location k (its weight is K S rows further)."""
  S = cfg.heads // cfg.routes
  return g // S * cfg.route_rows + k * S + g % S


def product(a, b, a_axis, b_axis, dtype):
  """a . b over the given axes on the MXU, float32 results: operands in `dtype` (h's, as XLA's
  product of h would have them), at full precision when that is float32."""
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (((a_axis,), (b_axis,)), ((), ())),
                             precision=HIGHEST if dtype == F32 else None,
                             preferred_element_type=F32)


def backward(cfg, hf, first, w_ref, tab_s, fac_s, dw_s, db_s, dh_s, dots):
  """Route by route: the chunk's d logits g (2 K S, chunk_lanes) from its dots <h[p0], d read>
  and <h[p1], d read> (in the location and weight rows of phi's table) through the clip and
  sigmoid (locations) and the softmax over the points (weights); then phi's backward:
  dh[chunk, window] += g^T W, d W += g h[chunk, window], d b += the sum of g."""
  KS = cfg.route_rows // 2
  width, starts = cfg.route_window
  rows = pl.ds(first, cfg.chunk_lanes)
  for r, a in enumerate(starts):
    loc, wgt = pl.ds(r * 2 * KS, KS), pl.ds(r * 2 * KS + KS, KS)
    e0, e1 = dots[r * 2 * KS:r * 2 * KS + KS], dots[r * 2 * KS + KS:(r + 1) * 2 * KS]
    pos, w = tab_s[loc, :], tab_s[wgt, :]
    f = pos - jnp.floor(pos)
    d_loc = w * (e1 - e0) * fac_s[pl.ds(r * KS, KS), :]
    t = w * ((1.0 - f) * e0 + f * e1)  # weight x d weight
    g = jnp.concatenate([d_loc, t - w * over_points(cfg, t, jnp.add)], axis=0)
    dh_s[rows, a:a + width] += product(g.T, w_ref[r], 1, 0, w_ref.dtype)
    dw_s[r] += product(g, hf[rows, a:a + width], 1, 0, w_ref.dtype)
    db_s[pl.ds(r * 2 * KS, 2 * KS), :] += jnp.sum(g, axis=1, keepdims=True)
