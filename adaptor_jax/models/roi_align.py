"""RoIAlign (He et al. 2017) for Mask R-CNN's box and mask heads, with static shapes (jit-able on
TPU, vmap-able over a batch), channels last.

  roi_align             one (H, W, C) map, K boxes -> (K, out_h, out_w, C): torchvision.ops.
                        roi_align's arithmetic (and mmcv's RoIAlign, pool_mode="avg") for a fixed
                        sampling_ratio > 0
  multilevel_roi_align  an FPN's maps, K boxes: each box on the level mmdetection's
                        SingleRoIExtractor assigns it (finest_scale 56), aligned there
  batch_multilevel_roi_align  the same over a leading batch axis (vmap)
  map_roi_levels        the level of each box, bit for bit as mmdetection computes it in torch

Boxes are float32 (x1, y1, x2, y2) in input-image pixels (mmdetection's convention); a map of
stride s sees them scaled by spatial_scale = 1 / s.

The arithmetic, per box and bin (torchvision's roi_align_kernel.cpp / roi_align_common.h):
  start = x1 * spatial_scale - 0.5 when aligned (the half-pixel shift of "RoIAlign v2"), else
  x1 * spatial_scale; roi width = x2 * spatial_scale - (same offset) - start, forced >= 1 when not
  aligned; bin = width / out_w; sample i of bin p at start + p * bin + (i + 0.5) * bin / ratio.
  A sample is bilinear in the map with torchvision's edge rules: a sample with y < -1, y > H,
  x < -1 or x > W (or NaN) is 0; else a coordinate <= 0 is taken as 0, one at or past the last
  row / column as exactly that row / column; the bin is the mean of its ratio^2 samples (empty
  samples count).

Fixed sampling ratio. mmdetection's Mask R-CNN configs (and Detectron2's, POOLER_SAMPLING_RATIO)
use sampling_ratio=0: ceil(roi size / output size) samples per bin, a data-dependent count no
static shape can hold. We take a fixed ratio, 2 by default. TF Model Garden's TPU Mask R-CNN
(official/vision/ops/spatial_transform_ops.py, multilevel_crop_and_resize) samples once per bin,
at its centre, without the half-pixel shift (its "2x2" is the four bilinear corners, not four
samples). tests/parity_roi_align.py measures what the fixed ratio departs from the adaptive one:
with boxes of 8-600 px on the levels mmdetection assigns (there the adaptive ratio is 1-6, median
2, for 7x7; 1-3, median 1, for 14x14) and smooth features, ratio 2 is off by rms 1.8% of the
output at 7x7 and 0.6% at 14x14 (ratio 1: 9.5% and 2.3%; ratio 4: 0.8% and 0.8%).

Formulation. The bilinear weights are separable: a sample's four corners are (row taps) x
(column taps), and a box's samples form a grid. Per box we compute 2 * ratio * out_h row taps
and 2 * ratio * out_w column taps (index, weight; the weight folds in the edge rules and 1 /
ratio); the bin values are the weighted sum of (2 ratio)^2 "corner pairs" (row tap a, column tap
b of each bin), each one jnp.take of (K, out_h, out_w) rows from the map flattened to (H * W, C)
(rows of C contiguous values: a plain row gather on TPU), accumulated in float32 by a lax.scan
over the pairs (elementwise VPU work; an einsum would go to the MXU at bf16 precision on TPU).
Why a scan: XLA:TPU does not fuse a gather into its consumer, so one gather of every corner at
once materialises K (2 ratio)^2 out_h out_w C values (16x the output at ratio 2) and its float32
copy. Compiled ahead of time for a v5e chip (batch 2, 512 boxes, 256 channels, the 4 levels of
an 800 x 1216 image, 7x7, bf16), forward + backward held 1178 MiB of temporaries that way and
249 MiB with the scan (a loop over the 4 row taps, each gathering its 4 column taps: 431 MiB).
The gathered volume itself is inherent to any XLA formulation; only a kernel that accumulates in
VMEM as it gathers (Pallas) would avoid writing it out. We did not take TF's one-hot matmul
(use_einsum_gather): K * out_h * H * W * C multiply-adds and a (K, out_h, W, C) intermediate, far
more than the gathers on a stride-4 level (200 x 304).

Gradients reach the features only (autodiff of the gather: exactly torchvision's backward
kernel); the boxes are wrapped in stop_gradient, as mmcv's and torchvision's ops give none.

Multilevel. Levels are concatenated into one flattened (sum H_l W_l, C) map and each box carries
its level's row offset, height, width and scale: a box is aligned once, on its own level, at the
cost of one single-level roi_align (no compute-everywhere-and-select).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np


def _pair(output_size):
  """output_size as (out_h, out_w) of positive ints."""
  size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
  if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
    raise ValueError(f"output_size must be a positive int or a pair of them, got {output_size!r}")
  return size


def _check(rois_K4, sampling_ratio):
  if rois_K4.ndim != 2 or rois_K4.shape[1] != 4:
    raise ValueError(f"rois_K4 must be (K, 4) boxes (x1, y1, x2, y2), got {rois_K4.shape}")
  if not isinstance(sampling_ratio, int) or sampling_ratio < 1:
    raise ValueError(f"sampling_ratio must be a fixed int >= 1, got {sampling_ratio!r}")


def _taps(start_K, length_K, size_K, n_out, ratio):
  """One axis's taps: (index, weight) of the 2 * ratio * n_out corners per box, (K, n_out, 2r).

  Samples at start + p * bin + (i + 0.5) * bin / ratio (torchvision's order of operations);
  weight 0 for a sample outside [-1, size]; the low / high corner weights (1 - l, l) / ratio."""
  bin_K = length_K / n_out
  p = jnp.arange(n_out, dtype=jnp.float32)[None, :, None]
  i = (jnp.arange(ratio, dtype=jnp.float32) + 0.5)[None, None, :]
  coord = (start_K[:, None, None] + p * bin_K[:, None, None]) + i * bin_K[:, None, None] / ratio
  size = size_K[:, None, None]
  last = size.astype(jnp.int32) - 1
  inside = (coord >= -1.0) & (coord <= size)   # False for NaN
  coord = jnp.where(inside, jnp.maximum(coord, 0.0), 0.0)
  low = jnp.floor(coord).astype(jnp.int32)
  edge = low >= last
  low = jnp.where(edge, last, low)
  high = jnp.where(edge, last, low + 1)
  frac = jnp.where(edge, 0.0, coord - low.astype(jnp.float32))
  w_low = jnp.where(inside, 1.0 - frac, 0.0) / ratio
  w_high = jnp.where(inside, frac, 0.0) / ratio
  K = start_K.shape[0]
  index = jnp.stack([low, high], axis=-1).reshape(K, n_out, 2 * ratio)
  weight = jnp.stack([w_low, w_high], axis=-1).reshape(K, n_out, 2 * ratio)
  return index, weight


def _align_flat(flat_NC, rois_K4, offset_K, height_K, width_K, scale_K, out_hw, ratio, aligned):
  """RoIAlign of K boxes on maps stored row-major in flat_NC, box k's map at rows offset_K[k]..."""
  out_h, out_w = out_hw
  rois_K4 = jax.lax.stop_gradient(rois_K4.astype(jnp.float32))
  shift = 0.5 if aligned else 0.0
  x1, y1, x2, y2 = (rois_K4[:, j] * scale_K - shift for j in range(4))
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:   # malformed boxes forced to 1 x 1 (torchvision, mmcv)
    roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
  rows, wy = _taps(y1, roi_h, height_K.astype(jnp.float32), out_h, ratio)   # (K, out_h, 2r)
  cols, wx = _taps(x1, roi_w, width_K.astype(jnp.float32), out_w, ratio)    # (K, out_w, 2r)
  K, pairs = rois_K4.shape[0], (2 * ratio) ** 2
  index = (offset_K[:, None, None, None, None] + rows[:, :, :, None, None] *
           width_K[:, None, None, None, None] + cols[:, None, None, :, :])  # (K, oh, 2r, ow, 2r)
  weight = wy[:, :, :, None, None] * wx[:, None, None, :, :]
  # (2r)^2 corner pairs (row tap a, column tap b), each one corner of every sample of every bin
  index_PKhw = jnp.moveaxis(index, (2, 4), (0, 1)).reshape(pairs, K, out_h, out_w)
  weight_PKhw = jnp.moveaxis(weight, (2, 4), (0, 1)).reshape(pairs, K, out_h, out_w)

  def add_corner(acc_KhwC, pair):
    index_Khw, weight_Khw = pair
    corner_KhwC = jnp.take(flat_NC, index_Khw, axis=0, mode="clip").astype(jnp.float32)
    return acc_KhwC + weight_Khw[..., None] * corner_KhwC, None

  zeros = jnp.zeros((K, out_h, out_w, flat_NC.shape[1]), jnp.float32)
  out, _ = jax.lax.scan(add_corner, zeros, (index_PKhw, weight_PKhw))
  return out.astype(flat_NC.dtype)


def roi_align(features_HWC, rois_K4, output_size, spatial_scale, sampling_ratio=2, aligned=True):
  """torchvision.ops.roi_align on one channels-last map, fixed sampling_ratio: (K, oh, ow, C).

  rois_K4: (x1, y1, x2, y2) in the coordinates spatial_scale maps onto the map (image pixels,
  spatial_scale = 1 / stride). The boxes get no gradient."""
  if features_HWC.ndim != 3:
    raise ValueError(f"features_HWC must be one (H, W, C) map, got {features_HWC.shape}")
  _check(rois_K4, sampling_ratio)
  H, W, C = features_HWC.shape
  K = rois_K4.shape[0]
  full = lambda v, dtype: jnp.full((K,), v, dtype)
  return _align_flat(features_HWC.reshape(H * W, C), rois_K4, full(0, jnp.int32),
                     full(H, jnp.int32), full(W, jnp.int32), full(spatial_scale, jnp.float32),
                     _pair(output_size), sampling_ratio, aligned)


def _log2_f32(v):
  """float32 log2, correctly rounded (as torch's float32 log2 is at mmdetection's boundaries)."""
  return float(np.float32(math.log2(float(v)))) if v > 0 else -math.inf


def level_thresholds(num_levels, finest_scale=56):
  """The least float32 sqrt(w h) that mmdetection's map_roi_levels, in torch's float32
  (scale / finest_scale + 1e-6, log2, floor), puts on level j, for j = 1..num_levels - 1."""
  f, eps, zero = np.float32(finest_scale), np.float32(1e-6), np.float32(0)
  level = lambda s: math.floor(_log2_f32(np.float32(s) / f + eps))
  thresholds = []
  for j in range(1, num_levels):
    s = np.float32(finest_scale * 2.0 ** j)
    while level(np.nextafter(s, zero)) >= j:
      s = np.nextafter(s, zero)
    while level(s) < j:
      s = np.nextafter(s, np.float32(np.inf))
    thresholds.append(float(s))
  return thresholds


def _area_threshold(t):
  """The least float32 area w h whose float32 sqrt (correctly rounded) reaches t."""
  a, zero = np.float32(t) * np.float32(t), np.float32(0)
  while np.sqrt(np.nextafter(a, zero)) >= t:
    a = np.nextafter(a, zero)
  while np.sqrt(a) < t:
    a = np.nextafter(a, np.float32(np.inf))
  return float(a)


def map_roi_levels(rois_K4, num_levels, finest_scale=56):
  """mmdetection's SingleRoIExtractor.map_roi_levels: (K,) int32 levels.

  floor(log2(sqrt(w h) / finest_scale + 1e-6)) clamped to [0, num_levels - 1], as the count of
  level_thresholds that sqrt(w h) reaches, compared on w h: the level torch's float32 arithmetic
  gives, to the last ulp at every boundary, with no sqrt, division or log in the graph to round
  otherwise (a TPU's float32 sqrt and log are not correctly rounded). A box of negative area goes
  to level 0 (in mmdetection its NaN level matches no level: its features stay 0)."""
  rois_K4 = rois_K4.astype(jnp.float32)
  area_K = (rois_K4[:, 2] - rois_K4[:, 0]) * (rois_K4[:, 3] - rois_K4[:, 1])
  level_K = jnp.zeros(rois_K4.shape[:1], jnp.int32)
  for t in level_thresholds(num_levels, finest_scale):
    level_K += (area_K >= jnp.float32(_area_threshold(t))).astype(jnp.int32)
  return level_K


def multilevel_roi_align(features, rois_K4, output_size, strides=(4, 8, 16, 32), finest_scale=56,
                         sampling_ratio=2, aligned=True):
  """mmdetection's SingleRoIExtractor (RoIAlign layers, fixed sampling_ratio): (K, oh, ow, C).

  features: per-level (H_l, W_l, C) maps, finest first, with their strides. Each box is aligned
  on the level map_roi_levels gives it with spatial_scale 1 / stride; padded boxes (all zeros)
  go to level 0 and give finite values."""
  if len(features) != len(strides) or not features:
    raise ValueError(f"features must hold one map per stride {strides}, got {len(features)}")
  if any(f.ndim != 3 or f.shape[2] != features[0].shape[2] for f in features):
    raise ValueError(f"features must be (H, W, C) maps of one C, got "
                     f"{[tuple(f.shape) for f in features]}")
  _check(rois_K4, sampling_ratio)
  dtype = jnp.result_type(*features)
  C = features[0].shape[2]
  flat_NC = jnp.concatenate([f.reshape(-1, C).astype(dtype) for f in features], axis=0)
  sizes = [f.shape[0] * f.shape[1] for f in features]
  offsets = jnp.asarray([sum(sizes[:i]) for i in range(len(sizes))], jnp.int32)
  heights = jnp.asarray([f.shape[0] for f in features], jnp.int32)
  widths = jnp.asarray([f.shape[1] for f in features], jnp.int32)
  scales = jnp.asarray([1.0 / s for s in strides], jnp.float32)
  level_K = map_roi_levels(rois_K4, len(features), finest_scale)
  return _align_flat(flat_NC, rois_K4, offsets[level_K], heights[level_K], widths[level_K],
                     scales[level_K], _pair(output_size), sampling_ratio, aligned)


def batch_multilevel_roi_align(features, rois_BK4, output_size, **kwargs):
  """multilevel_roi_align over a leading batch axis: (B, H_l, W_l, C) maps, (B, K, 4) boxes."""
  return jax.vmap(lambda f, r: multilevel_roi_align(f, r, output_size, **kwargs))(
      list(features), rois_BK4)
