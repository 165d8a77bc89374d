"""Box ops for a two-stage detector (Mask R-CNN as mmdetection builds it): IoU, the delta box
coder, anchors and greedy NMS, in pure jax.numpy with every shape static, as TF Model Garden's
detection ops are, so that they jit, vmap over a batch of images and compile for TPU.

Boxes are float32 (x1, y1, x2, y2) in pixels with mmdetection's convention: width = x2 - x1
(no +1). The arithmetic follows the reference implementations operation by operation in
float32, so that results match them to the last bit where XLA's ops are correctly rounded
(its exp, log and vectorised division on CPU and TPU can be a few ulps off: an IoU that close
to an NMS threshold may decide differently):

  iou          torchvision.ops.box_iou, except 0 (not NaN) where the union is 0 (padding)
  encode       mmdet 3.x DeltaXYWHBBoxCoder.encode (bbox2delta)
  decode       its decode (delta2bbox with clip_border=True, add_ctr_clamp=False): dw, dh
               clamped to |log(wh_ratio_clip)|, boxes clipped to max_shape (h, w) when given
  anchors      mmdet's AnchorGenerator.grid_priors (scale_major=True, base sizes = strides):
               the order of the RPN's A output channels, which imported weights follow
  nms          torchvision.ops.nms: greedy in score order, IoU > threshold suppresses
  batched_nms  torchvision.ops.batched_nms: NMS within each idxs value (class or level)
  multiclass_nms  mmdet's multiclass_nms (the box head's test-time detections): every (box,
               class) above score_thr, NMS per class, the best max_per_img; with static shapes
               only the max_candidates best pairs enter NMS (mmdet takes every one above the
               threshold): a departure only for an image with more such pairs

The NMS here builds the (N, N) IoU matrix of the candidates and walks them in score order in a
lax.while_loop: memory N^2 floats (16 MB at N = 2000) and N sequential steps at most, which
suits the RPN's and the box head's candidate counts (up to a few thousand). Outputs have a
static size max_out, padded with index -1.
"""
import math

import jax.numpy as jnp
import numpy as np
from jax import lax


def _check_boxes(name, boxes, ndim=None):
  """Raise ValueError unless `boxes` is (..., 4) (exactly ndim dims when given)."""
  shape = jnp.shape(boxes)
  if not shape or shape[-1] != 4 or (ndim is not None and len(shape) != ndim):
    want = "(N, 4)" if ndim == 2 else "(..., 4)"
    raise ValueError(f"{name}: want boxes of shape {want}, got {shape}")


def area(boxes_N4):
  """(x2 - x1) * (y2 - y1) of boxes (..., 4): negative for inverted boxes, as torchvision's."""
  _check_boxes("boxes_N4", boxes_N4)
  return (boxes_N4[..., 2] - boxes_N4[..., 0]) * (boxes_N4[..., 3] - boxes_N4[..., 1])


def clip(boxes_N4, hw):
  """Boxes (..., 4) with x clamped to [0, w] and y to [0, h]; hw: (h, w), or (h, w, c) as mmdet
  allows, static or an array (per image under vmap)."""
  _check_boxes("boxes_N4", boxes_N4)
  if len(hw) < 2:
    raise ValueError(f"hw: want (h, w), got {hw}")
  h = jnp.asarray(hw[0], boxes_N4.dtype)
  w = jnp.asarray(hw[1], boxes_N4.dtype)
  upper = jnp.stack([w, h, w, h])
  return jnp.minimum(jnp.maximum(boxes_N4, 0), upper)


def iou(boxes1_N4, boxes2_M4):
  """(N, M) intersection over union, torchvision.ops.box_iou's arithmetic; 0 where the union is
  0 (all-zero padded boxes, or two zero-area boxes) instead of NaN."""
  _check_boxes("boxes1_N4", boxes1_N4, 2)
  _check_boxes("boxes2_M4", boxes2_M4, 2)
  area1_N, area2_M = area(boxes1_N4), area(boxes2_M4)
  lt_NM2 = jnp.maximum(boxes1_N4[:, None, :2], boxes2_M4[None, :, :2])
  rb_NM2 = jnp.minimum(boxes1_N4[:, None, 2:], boxes2_M4[None, :, 2:])
  wh_NM2 = jnp.maximum(rb_NM2 - lt_NM2, 0)
  inter_NM = wh_NM2[..., 0] * wh_NM2[..., 1]
  union_NM = area1_N[:, None] + area2_M[None, :] - inter_NM
  nonzero = union_NM != 0
  return jnp.where(nonzero, inter_NM / jnp.where(nonzero, union_NM, 1), 0)


def _vector4(name, values, dtype):
  if len(values) != 4:
    raise ValueError(f"{name}: want 4 values (x, y, w, h), got {values}")
  return jnp.asarray(values, dtype)


def encode(boxes_N4, targets_N4, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0)):
  """Deltas (dx, dy, dw, dh) (..., 4) that take boxes to targets, normalised by means and stds:
  mmdet's bbox2delta. Zero-width boxes give inf / NaN, as mmdet's do."""
  _check_boxes("boxes_N4", boxes_N4)
  _check_boxes("targets_N4", targets_N4)
  if jnp.shape(boxes_N4) != jnp.shape(targets_N4):
    raise ValueError(f"targets_N4: want the shape of boxes_N4 {jnp.shape(boxes_N4)}, "
                     f"got {jnp.shape(targets_N4)}")
  p = boxes_N4.astype(jnp.float32)
  g = targets_N4.astype(jnp.float32)
  px, py = (p[..., 0] + p[..., 2]) * 0.5, (p[..., 1] + p[..., 3]) * 0.5
  pw, ph = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
  gx, gy = (g[..., 0] + g[..., 2]) * 0.5, (g[..., 1] + g[..., 3]) * 0.5
  gw, gh = g[..., 2] - g[..., 0], g[..., 3] - g[..., 1]
  deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(gw / pw), jnp.log(gh / ph)], -1)
  return (deltas - _vector4("means", means, jnp.float32)) / _vector4("stds", stds, jnp.float32)


def decode(boxes_N4, deltas_N4, means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0),
           max_shape=None, wh_ratio_clip=16 / 1000):
  """Boxes from deltas, mmdet's delta2bbox (clip_border=True, add_ctr_clamp=False).

  boxes_N4: (..., 4). deltas_N4: (..., 4 K) with the same leading shape, K deltas per box (K > 1:
  class-specific regression, as mmdet's bbox head); returns (..., 4 K). dw and dh are clamped to
  |log(wh_ratio_clip)|; with max_shape (h, w) (or (h, w, c); an array under vmap), x is clipped
  to [0, w] and y to [0, h].
  """
  _check_boxes("boxes_N4", boxes_N4)
  shape = jnp.shape(deltas_N4)
  if len(shape) != jnp.ndim(boxes_N4) or shape[:-1] != jnp.shape(boxes_N4)[:-1] or (
      shape[-1] == 0 or shape[-1] % 4):
    raise ValueError(f"deltas_N4: want (..., 4 K) with the leading shape of boxes_N4 "
                     f"{jnp.shape(boxes_N4)}, got {shape}")
  k = shape[-1] // 4
  deltas = deltas_N4.reshape(*shape[:-1], k, 4)
  deltas = deltas * _vector4("stds", stds, deltas.dtype) + _vector4("means", means, deltas.dtype)
  rois = boxes_N4[..., None, :]
  pxy = (rois[..., :2] + rois[..., 2:]) * 0.5
  pwh = rois[..., 2:] - rois[..., :2]
  max_ratio = abs(math.log(wh_ratio_clip))
  dwh = jnp.clip(deltas[..., 2:], -max_ratio, max_ratio)
  gxy = pxy + pwh * deltas[..., :2]
  gwh = pwh * jnp.exp(dwh)
  out = jnp.concatenate([gxy - gwh * 0.5, gxy + gwh * 0.5], -1)
  if max_shape is not None:
    if len(max_shape) < 2:
      raise ValueError(f"max_shape: want (h, w) or (h, w, c), got {max_shape}")
    out = clip(out, max_shape)
  return out.reshape(shape)


def base_anchors(base_size, scales=(8,), ratios=(0.5, 1.0, 2.0), center_offset=0.0):
  """One cell's (A, 4) anchors, A = len(ratios) * len(scales), ratio-major: mmdet's
  gen_single_level_base_anchors with scale_major=True, in its float32 arithmetic (NumPy)."""
  ratios_R = np.asarray(ratios, np.float32)
  scales_S = np.asarray(scales, np.float32)
  h_ratios = np.sqrt(ratios_R)
  w_ratios = np.float32(1) / h_ratios
  ws = (base_size * w_ratios[:, None] * scales_S[None, :]).reshape(-1)
  hs = (base_size * h_ratios[:, None] * scales_S[None, :]).reshape(-1)
  center = center_offset * base_size
  return np.stack([center - 0.5 * ws, center - 0.5 * hs, center + 0.5 * ws, center + 0.5 * hs],
                  -1)


def anchors(feature_sizes, strides=(4, 8, 16, 32, 64), scales=(8,), ratios=(0.5, 1.0, 2.0),
            center_offset=0.0, base_sizes=None):
  """Per level an (H * W * A, 4) float32 array of anchors, mmdet's AnchorGenerator.grid_priors.

  feature_sizes: one (H, W) per level; strides: the levels' strides; base_sizes: the anchors'
  base sizes (before scales), the strides when None (mmdet's default, Mask R-CNN's RPN).
  Order: cells row-major (x fastest), within a cell the A = len(ratios) * len(scales) anchors
  ratio-major; the anchors of cell (y, x) are the base anchors shifted by (x, y) * stride, the
  base anchors centred on center_offset * base size. The RPN's outputs at a level, (H, W, A)
  flattened, line up with these rows.
  """
  if len(feature_sizes) != len(strides) or any(len(s) != 2 for s in feature_sizes):
    raise ValueError(f"feature_sizes: want one (H, W) per stride {strides}, got {feature_sizes}")
  if not 0 <= center_offset <= 1:
    raise ValueError(f"center_offset: want a value in [0, 1], got {center_offset}")
  base_sizes = strides if base_sizes is None else base_sizes
  if len(base_sizes) != len(strides):
    raise ValueError(f"base_sizes: want one per stride {strides}, got {base_sizes}")
  out = []
  for (h, w), stride, base_size in zip(feature_sizes, strides, base_sizes):
    base_A4 = jnp.asarray(base_anchors(base_size, scales, ratios, center_offset))
    shift_x = jnp.arange(w, dtype=jnp.float32) * stride
    shift_y = jnp.arange(h, dtype=jnp.float32) * stride
    xx_HW = jnp.broadcast_to(shift_x[None, :], (h, w))
    yy_HW = jnp.broadcast_to(shift_y[:, None], (h, w))
    shifts_HW4 = jnp.stack([xx_HW, yy_HW, xx_HW, yy_HW], -1)
    out.append((shifts_HW4[:, :, None, :] + base_A4).reshape(-1, 4))
  return out


def _threshold(iou_threshold):
  """A static threshold as the float32 t with (iou > t) == (float(iou) > iou_threshold): the
  largest float32 not above it (torchvision compares the float32 IoU with a double)."""
  if isinstance(iou_threshold, (int, float)):
    t = np.float32(iou_threshold)
    if float(t) > iou_threshold:
      t = np.nextafter(t, np.float32(-np.inf))
    return t
  return iou_threshold


def _check_candidates(boxes_N4, scores_N, valid_N, idxs_N, max_out):
  _check_boxes("boxes_N4", boxes_N4, 2)
  n = boxes_N4.shape[0]
  for name, x in (("scores_N", scores_N), ("valid_N", valid_N), ("idxs_N", idxs_N)):
    if x is not None and jnp.shape(x) != (n,):
      raise ValueError(f"{name}: want shape ({n},) as boxes_N4 {boxes_N4.shape}, "
                       f"got {jnp.shape(x)}")
  if not isinstance(max_out, (int, np.integer)) or max_out < 1:
    raise ValueError(f"max_out: want a static int >= 1, got {max_out}")


def _nms(boxes_N4, scores_N, idxs_N, iou_threshold, max_out, valid_N):
  """Greedy NMS over boxes sharing an idxs value (all of them when idxs_N is None)."""
  n = boxes_N4.shape[0]
  if n == 0:
    return jnp.full((max_out,), -1, jnp.int32), jnp.zeros((max_out,), bool)
  valid_N = jnp.ones((n,), bool) if valid_N is None else valid_N.astype(bool)
  # Score descending, ties by lower index (a stable sort), padding last. -0.0 and 0.0 are one key.
  neg_N = jnp.where(scores_N == 0, jnp.zeros_like(scores_N), -scores_N)
  padding_N = (~valid_N).astype(jnp.int32)
  _, _, order_N = lax.sort((padding_N, neg_N, jnp.arange(n, dtype=jnp.int32)), num_keys=2,
                           is_stable=True)
  boxes_N4 = boxes_N4[order_N]
  live_N = valid_N[order_N]
  over_NN = iou(boxes_N4, boxes_N4) > _threshold(iou_threshold)
  if idxs_N is not None:
    idxs_N = idxs_N[order_N]
    over_NN = over_NN & (idxs_N[:, None] == idxs_N[None, :])

  def cond(state):  # padding is sorted last: the first padded candidate ends the walk
    i, count, _, _ = state
    return (i < n) & (count < max_out) & live_N[jnp.minimum(i, n - 1)]

  def body(state):
    i, count, removed_N, out = state
    keep = live_N[i] & ~removed_N[i]
    removed_N = removed_N | (over_NN[i] & keep)
    out = out.at[jnp.where(keep, count, max_out)].set(order_N[i], mode="drop")
    return i + 1, count + keep.astype(jnp.int32), removed_N, out

  init = (jnp.int32(0), jnp.int32(0), jnp.zeros((n,), bool), jnp.full((max_out,), -1, jnp.int32))
  out = lax.while_loop(cond, body, init)[3]
  return out, out >= 0


def nms(boxes_N4, scores_N, iou_threshold, max_out, valid_N=None):
  """Greedy non-maximum suppression, torchvision.ops.nms with static shapes.

  Candidates in score order (ties: lower index first, as torchvision's stable sort on CPU); each
  one kept unless a kept one overlaps it with IoU > iou_threshold. valid_N (bool, optional)
  masks padded candidates out: never kept, suppressing nothing. Returns (indices (max_out,)
  int32 into the input, score descending, -1 past the kept ones; valid (max_out,) bool). Memory
  N^2 (the IoU matrix): meant for N up to a few thousand.
  """
  _check_candidates(boxes_N4, scores_N, valid_N, None, max_out)
  return _nms(boxes_N4, scores_N, None, iou_threshold, max_out, valid_N)


def batched_nms(boxes_N4, scores_N, idxs_N, iou_threshold, max_out, valid_N=None):
  """NMS within each idxs_N value (a class, or an RPN level), torchvision.ops.batched_nms: no
  box suppresses one of another value. Same outputs as nms, all kept boxes score descending
  (ties: lower index first; torchvision's per-class path re-sorts with an unstable sort, so its
  order among equal scores can differ). Exact coordinates (a same-value mask on the IoU matrix),
  as that path; mmcv's batched_nms (and torchvision's for small N) offsets the boxes by
  idxs * (max + 1) instead, which rounds coordinates and can flip a decision at an IoU within
  float error of the threshold."""
  _check_candidates(boxes_N4, scores_N, valid_N, idxs_N, max_out)
  return _nms(boxes_N4, scores_N, idxs_N, iou_threshold, max_out, valid_N)


def multiclass_nms(boxes_PK, scores_PC, *, score_thr, iou_threshold, max_per_img,
                   max_candidates=1000, valid_P=None):
  """mmdet's multiclass_nms with static shapes. boxes_PK: (P, 4 C) class-specific boxes (or
  (P, 4), one box for every class); scores_PC: (P, C + 1) probabilities, background last;
  valid_P masks padded RoIs. The (box, class) pairs scoring above score_thr, in row-major (RoI,
  class) order, at most the max_candidates best (ties: lower index first), go through
  batched_nms by class. Returns (boxes (max_per_img, 4), scores, labels (int32), valid), best
  first; past the kept ones boxes and scores are 0 and labels -1."""
  P, C = jnp.shape(scores_PC)[0], jnp.shape(scores_PC)[-1] - 1
  if jnp.ndim(scores_PC) != 2 or C < 1 or jnp.shape(boxes_PK) not in ((P, 4), (P, 4 * C)):
    raise ValueError(f"scores_PC: want (P, C + 1) with boxes_PK (P, 4 C) or (P, 4), got "
                     f"{jnp.shape(scores_PC)} and {boxes_PK.shape}")
  pairs_N4 = jnp.broadcast_to(boxes_PK.reshape(P, -1, 4), (P, C, 4)).reshape(P * C, 4)
  scores_N = scores_PC[:, :C].reshape(P * C)
  labels_N = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (P, C)).reshape(P * C)
  ok_N = scores_N > score_thr
  if valid_P is not None:
    ok_N = ok_N & jnp.repeat(valid_P.astype(bool), C)
  best_K, take_K = lax.top_k(jnp.where(ok_N, scores_N, -jnp.inf), min(max_candidates, P * C))
  keep, valid = batched_nms(pairs_N4[take_K], best_K, labels_N[take_K], iou_threshold,
                            max_per_img, ok_N[take_K])
  return (jnp.where(valid[:, None], pairs_N4[take_K][keep], 0.0),
          jnp.where(valid, best_K[keep], 0.0), jnp.where(valid, labels_N[take_K][keep], -1), valid)
