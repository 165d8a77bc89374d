"""The box ops (adaptor_jax/models/boxes.py) against NumPy oracles written from their references'
definitions: torchvision's box_iou, nms and batched_nms (greedy loops in float32 arithmetic),
mmdetection's DeltaXYWHBBoxCoder (bbox2delta / delta2bbox) and AnchorGenerator (cell by cell);
jit and vmap over a batch; shape errors. tests/parity_boxes.py compares with torchvision
itself."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptor_jax.models import boxes


def _rng(seed):
  return np.random.default_rng(seed)


def ulps(x, n):
  """n float32 ulps at the largest magnitude in x: the tolerance of results rounded a few times
  (XLA's exp and log are not NumPy's to the last bit)."""
  return n * float(np.spacing(np.abs(np.asarray(x, np.float32)).max()))


def random_boxes(rng, n, *, clusters=4, extent=100.0, size=(5.0, 40.0)):
  """n float32 boxes around a few centres: many overlaps at every IoU."""
  centres = rng.uniform(0, extent, size=(clusters, 2))
  c = centres[rng.integers(0, clusters, n)] + rng.normal(0, size[0], size=(n, 2))
  wh = rng.uniform(*size, size=(n, 2))
  return np.concatenate([c - wh / 2, c + wh / 2], -1).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Oracles.


def np_box_iou(a, b):
  """One pair's IoU as torchvision computes it, float32 scalars; 0 where the union is 0."""
  w = max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
  h = max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return np.float32(0) if union == 0 else inter / union


def np_iou(boxes1, boxes2):
  return np.array([[np_box_iou(a, b) for b in boxes2] for a in boxes1], np.float32)


def np_nms(boxes, scores, thr, valid=None, idxs=None):
  """Greedy NMS: candidates by score descending, then index; a candidate is kept unless a kept
  one of its idxs value has an IoU > thr with it (the float32 IoU against the double thr)."""
  n = len(scores)
  valid = np.ones(n, bool) if valid is None else valid
  idxs = np.zeros(n, int) if idxs is None else idxs
  keep = []
  for i in sorted(range(n), key=lambda i: (-float(scores[i]), i)):
    if valid[i] and not any(idxs[k] == idxs[i] and float(np_box_iou(boxes[k], boxes[i])) > thr
                            for k in keep):
      keep.append(i)
  return keep


def np_bbox2delta(p, g, means, stds):
  """mmdet's bbox2delta, float32."""
  px, py = (p[:, 0] + p[:, 2]) * np.float32(0.5), (p[:, 1] + p[:, 3]) * np.float32(0.5)
  pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
  gx, gy = (g[:, 0] + g[:, 2]) * np.float32(0.5), (g[:, 1] + g[:, 3]) * np.float32(0.5)
  gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
  deltas = np.stack([(gx - px) / pw, (gy - py) / ph, np.log(gw / pw), np.log(gh / ph)], -1)
  return (deltas - np.float32(means)) / np.float32(stds)


def np_delta2bbox(rois, deltas, means, stds, max_shape=None, wh_ratio_clip=16 / 1000):
  """mmdet's delta2bbox (clip_border=True, add_ctr_clamp=False), float32: deltas (N, 4 K)."""
  n, k = deltas.shape[0], deltas.shape[1] // 4
  d = deltas.reshape(-1, 4) * np.float32(stds) + np.float32(means)
  rois = np.repeat(rois, k, axis=0)
  pxy = (rois[:, :2] + rois[:, 2:]) * np.float32(0.5)
  pwh = rois[:, 2:] - rois[:, :2]
  max_ratio = np.float32(abs(np.log(wh_ratio_clip)))
  dwh = np.clip(d[:, 2:], -max_ratio, max_ratio)
  gxy = pxy + pwh * d[:, :2]
  gwh = pwh * np.exp(dwh)
  out = np.concatenate([gxy - gwh * np.float32(0.5), gxy + gwh * np.float32(0.5)], -1)
  if max_shape is not None:
    out[:, 0::2] = np.clip(out[:, 0::2], 0, np.float32(max_shape[1]))
    out[:, 1::2] = np.clip(out[:, 1::2], 0, np.float32(max_shape[0]))
  return out.reshape(n, 4 * k)


def np_mmdet_anchors(feature_size, stride, scales, ratios, center_offset=0.0):
  """mmdet's AnchorGenerator at one level (scale_major, base size = stride), cell by cell."""
  base = []
  for r in ratios:                  # ratio-major, then scale
    for s in scales:
      h_ratio = np.sqrt(np.float32(r))
      w_ratio = np.float32(1) / h_ratio
      w, h = stride * w_ratio * np.float32(s), stride * h_ratio * np.float32(s)
      c = center_offset * stride
      base.append(np.array([c - 0.5 * w, c - 0.5 * h, c + 0.5 * w, c + 0.5 * h], np.float32))
  rows = []
  for y in range(feature_size[0]):
    for x in range(feature_size[1]):  # x fastest, then the cell's anchors
      shift = np.float32([x * stride, y * stride, x * stride, y * stride])
      rows += [b + shift for b in base]
  return np.array(rows, np.float32)


# ------------------------------------------------------------------------------------------------
# IoU, area, clip.


def test_iou_is_torchvisions_and_zero_on_an_empty_union():
  rng = _rng(0)
  a = random_boxes(rng, 9)
  b = random_boxes(rng, 7)
  a[1] = [10, 10, 10, 30]           # zero width
  a[2] = 0                          # padding
  b[0] = 0
  b[1] = [10, 20, 10, 20]           # a point
  b[2] = a[3]                       # identical to a box of a
  b[3] = a[4] + np.float32([200, 0, 200, 0])  # disjoint
  got = np.asarray(boxes.iou(jnp.asarray(a), jnp.asarray(b)))
  assert got.shape == (9, 7) and np.isfinite(got).all()
  np.testing.assert_allclose(got, np_iou(a, b), rtol=0, atol=1e-6)
  assert got[2, 0] == 0 and got[1, 1] == 0 and got[3, 2] == 1 and got[4, 3] == 0


def test_area_and_clip():
  b = np.float32([[-5, 2, 30, 50], [1, 1, 4, 3], [0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(boxes.area(jnp.asarray(b))), [35 * 48, 6, 0])
  np.testing.assert_array_equal(np.asarray(boxes.clip(jnp.asarray(b), (40, 20))),
                                [[0, 2, 20, 40], [1, 1, 4, 3], [0, 0, 0, 0]])


# ------------------------------------------------------------------------------------------------
# The delta coder.

MEANS, STDS = (0.1, -0.2, 0.05, 0.0), (0.1, 0.1, 0.2, 0.2)  # mmdet's box head uses these stds


@pytest.mark.parametrize("means,stds", [((0.0,) * 4, (1.0,) * 4), (MEANS, STDS)])
def test_encode_is_mmdets_and_decode_inverts_it(means, stds):
  rng = _rng(1)
  p, g = random_boxes(rng, 50, extent=300), random_boxes(rng, 50, extent=300)
  deltas = np.asarray(boxes.encode(jnp.asarray(p), jnp.asarray(g), means, stds))
  np.testing.assert_allclose(deltas, np_bbox2delta(p, g, means, stds), rtol=1e-6, atol=1e-6)
  # far-off targets give large dx, dy; the sizes stay within the clamp (|dw| < 4.1)
  back = np.asarray(boxes.decode(jnp.asarray(p), jnp.asarray(deltas), means, stds))
  np.testing.assert_allclose(back, g, rtol=0, atol=ulps(g, 4))


def test_decode_is_mmdets_with_its_clamp_and_clip():
  rng = _rng(2)
  rois = random_boxes(rng, 60, extent=200)
  deltas = rng.normal(0, 2.0, size=(60, 4)).astype(np.float32)
  deltas[:10, 2:] = rng.choice([-9.0, 9.0], size=(10, 2))   # past |log(16/1000)| = 4.135
  for max_shape in (None, (150, 170), (150, 170, 3)):
    got = np.asarray(boxes.decode(jnp.asarray(rois), jnp.asarray(deltas), MEANS, STDS, max_shape))
    want = np_delta2bbox(rois, deltas, MEANS, STDS, max_shape)
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps(want, 2))
  clamped = np.asarray(boxes.decode(jnp.asarray(rois[:10]), jnp.asarray(deltas[:10])))
  wh = rois[:10, 2:] - rois[:10, :2]
  np.testing.assert_allclose((clamped[:, 2:] - clamped[:, :2]) / wh,
                             np.where(deltas[:10, 2:] > 0, 1000 / 16, 16 / 1000), rtol=1e-3)
  inside = np.asarray(boxes.decode(jnp.asarray(rois), jnp.asarray(deltas), max_shape=(150, 170)))
  assert inside[:, 0::2].min() >= 0 and inside[:, 0::2].max() <= 170
  assert inside[:, 1::2].min() >= 0 and inside[:, 1::2].max() <= 150
  assert np.isin(170, inside[:, 0::2]) and np.isin(0, inside[:, 1::2])  # the clip does bite


def test_decode_class_specific_deltas():
  """(N, 4 K) deltas, as mmdet's box head regresses per class: each K block its own decode."""
  rng = _rng(3)
  rois = random_boxes(rng, 20, extent=200)
  deltas = rng.normal(0, 0.5, size=(20, 12)).astype(np.float32)
  got = np.asarray(boxes.decode(jnp.asarray(rois), jnp.asarray(deltas), MEANS, STDS, (180, 190)))
  assert got.shape == (20, 12)
  want = np_delta2bbox(rois, deltas, MEANS, STDS, (180, 190))
  np.testing.assert_allclose(got, want, rtol=0, atol=ulps(want, 2))
  for k in range(3):
    one = boxes.decode(jnp.asarray(rois), jnp.asarray(deltas[:, 4 * k:4 * k + 4]), MEANS, STDS,
                       (180, 190))
    np.testing.assert_array_equal(got[:, 4 * k:4 * k + 4], np.asarray(one))


# ------------------------------------------------------------------------------------------------
# Anchors.


@pytest.mark.parametrize("center_offset", [0.0, 0.5])
def test_anchors_are_mmdets_in_its_order(center_offset):
  sizes, strides, scales, ratios = [(5, 7), (3, 1)], (8, 16), (8, 12), (0.5, 1.0, 2.0)
  got = boxes.anchors(sizes, strides, scales, ratios, center_offset)
  for g, size, stride in zip(got, sizes, strides):
    assert g.shape == (size[0] * size[1] * 6, 4) and g.dtype == jnp.float32
    np.testing.assert_array_equal(
        np.asarray(g), np_mmdet_anchors(size, stride, scales, ratios, center_offset))


def test_anchors_known_values():
  # mmdet's AnchorGenerator docstring: AnchorGenerator([16], [1.], [1.], [9]) on a 2x2 map
  np.testing.assert_array_equal(
      np.asarray(boxes.anchors([(2, 2)], (16,), (1,), (1.0,), base_sizes=(9,))[0]),
      [[-4.5, -4.5, 4.5, 4.5], [11.5, -4.5, 20.5, 4.5], [-4.5, 11.5, 4.5, 20.5],
       [11.5, 11.5, 20.5, 20.5]])
  # Mask R-CNN's RPN at stride 4 (scale 8): ratio 0.5 (wide) first, then 1, then 2 (tall)
  p2 = np.asarray(boxes.anchors([(1, 2)], (4,))[0])
  r = 16 * np.sqrt(2)
  np.testing.assert_allclose(p2, [[-r, -r / 2, r, r / 2], [-16, -16, 16, 16],
                                  [-r / 2, -r, r / 2, r], [4 - r, -r / 2, 4 + r, r / 2],
                                  [-12, -16, 20, 16], [4 - r / 2, -r, 4 + r / 2, r]], rtol=1e-6)
  assert [a.shape for a in boxes.anchors([(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)])] == [
      (192, 4), (48, 4), (12, 4), (3, 4), (3, 4)]


# ------------------------------------------------------------------------------------------------
# NMS.


def nms_case(seed, n=64, pad=6, num_idxs=None):
  """Overlapping boxes, scores with ties (eighths), `pad` padded entries (zero boxes, invalid)."""
  rng = _rng(seed)
  b = random_boxes(rng, n)
  s = (rng.integers(0, 8, n) / 8).astype(np.float32)
  valid = np.ones(n, bool)
  pad_at = rng.choice(n, pad, replace=False)
  valid[pad_at], b[pad_at], s[pad_at] = False, 0, 1.0   # padding with the top score: still out
  idxs = None if num_idxs is None else rng.integers(0, num_idxs, n).astype(np.int32)
  return b, s, valid, idxs


def padded(keep, max_out):
  keep = keep[:max_out]
  return np.array(keep + [-1] * (max_out - len(keep)), np.int32)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_is_greedy_nms(thr):
  """Ties, padding; max_out below and above the kept count; 0.3 rounds up in float32."""
  b, s, valid, _ = nms_case(4)
  want = np_nms(b, s, thr, valid)
  assert 4 < len(want) < 64
  for max_out in (4, 80):
    idx, ok = boxes.nms(jnp.asarray(b), jnp.asarray(s), thr, max_out, jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(idx), padded(want, max_out))
    np.testing.assert_array_equal(np.asarray(ok), padded(want, max_out) >= 0)
  idx, _ = boxes.nms(jnp.asarray(b), jnp.asarray(s), thr, 80)   # no mask: padding competes
  np.testing.assert_array_equal(np.asarray(idx), padded(np_nms(b, s, thr), 80))


def test_nms_threshold_is_compared_as_torchvision_does():
  """IoU 3/10 is float32(0.3) = 0.3000000119 > 0.3: torchvision (float32 IoU > double threshold)
  suppresses at 0.3, a float32 comparison would not. At 0.30000002 neither does."""
  b = jnp.asarray(np.float32([[0, 0, 10, 1], [0, 0, 3, 1]]))
  s = jnp.asarray(np.float32([0.9, 0.8]))
  assert float(boxes.iou(b, b)[0, 1]) == float(np.float32(0.3))
  np.testing.assert_array_equal(np.asarray(boxes.nms(b, s, 0.3, 2)[0]), [0, -1])
  np.testing.assert_array_equal(np.asarray(boxes.nms(b, s, 0.30000002, 2)[0]), [0, 1])


@pytest.mark.parametrize("num_idxs", [1, 3])
def test_batched_nms_is_per_value_greedy_nms(num_idxs):
  b, s, valid, idxs = nms_case(5, num_idxs=num_idxs)
  want = np_nms(b, s, 0.5, valid, idxs)
  for max_out in (7, 80):
    idx, ok = boxes.batched_nms(jnp.asarray(b), jnp.asarray(s), jnp.asarray(idxs), 0.5, max_out,
                                jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(idx), padded(want, max_out))
    np.testing.assert_array_equal(np.asarray(ok), padded(want, max_out) >= 0)
  if num_idxs == 1:
    np.testing.assert_array_equal(want, np_nms(b, s, 0.5, valid))
    idx, ok = boxes.batched_nms(jnp.zeros((0, 4)), jnp.zeros((0,)), jnp.zeros((0,), int), 0.5, 3)
    np.testing.assert_array_equal(np.asarray(idx), [-1, -1, -1])   # no candidates


def test_nms_jit_and_vmap_agree_with_one_image_at_a_time():
  cases = [nms_case(seed, num_idxs=3) for seed in (6, 7, 8)]
  b, s, valid, idxs = (jnp.asarray(np.stack(x)) for x in zip(*cases))
  plain = functools.partial(boxes.batched_nms, iou_threshold=0.6, max_out=20)
  batched = jax.jit(jax.vmap(plain))(b, s, idxs, valid_N=valid)
  for i, (bi, si, vi, ii) in enumerate(cases):
    want = padded(np_nms(bi, si, 0.6, vi, ii), 20)
    np.testing.assert_array_equal(np.asarray(batched[0][i]), want)
    single = jax.jit(plain)(jnp.asarray(bi), jnp.asarray(si), jnp.asarray(ii), valid_N=vi)
    np.testing.assert_array_equal(np.asarray(single[0]), want)
  # the threshold traced: compared in float32 (0.6 rounds up, no IoU here lies between)
  traced = jax.jit(boxes.nms, static_argnames="max_out")(b[0], s[0], 0.6, max_out=20)
  np.testing.assert_array_equal(np.asarray(traced[0]), padded(np_nms(cases[0][0], cases[0][1],
                                                                     0.6), 20))


def np_multiclass_nms(b_PK, s_PC, score_thr, thr, max_num):
  """mmdet's multiclass_nms: every (RoI, class) above score_thr, NMS per class, the best."""
  P, C = s_PC.shape[0], s_PC.shape[1] - 1
  pairs = np.broadcast_to(b_PK.reshape(P, -1, 4), (P, C, 4)).reshape(-1, 4)
  scores, labels = s_PC[:, :C].reshape(-1), np.tile(np.arange(C), P)
  inds = np.nonzero(scores > score_thr)[0]
  keep = np_nms(pairs[inds], scores[inds], thr, idxs=labels[inds])[:max_num]
  return pairs[inds][keep], scores[inds][keep], labels[inds][keep]


@pytest.mark.parametrize("class_specific", [True, False])
def test_multiclass_nms_is_mmdets(class_specific):
  rng = np.random.default_rng(11)
  P, C = 60, 5
  base = random_boxes(rng, P)
  b = (np.concatenate([base + rng.normal(0, 2, (P, 4)).astype(np.float32) for _ in range(C)], 1)
       if class_specific else base)
  logits = rng.normal(0, 2, (P, C + 1))
  s = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
  want_b, want_s, want_l = np_multiclass_nms(b, s, 0.05, 0.5, 40)
  got_b, got_s, got_l, ok = jax.jit(functools.partial(
      boxes.multiclass_nms, score_thr=0.05, iou_threshold=0.5, max_per_img=40,
      max_candidates=P * C))(jnp.asarray(b), jnp.asarray(s))
  n = len(want_s)
  assert 0 < n <= 40 and int(ok.sum()) == n
  np.testing.assert_array_equal(np.asarray(got_b[:n]), want_b)
  np.testing.assert_array_equal(np.asarray(got_s[:n]), want_s)
  np.testing.assert_array_equal(np.asarray(got_l[:n]), want_l)
  assert np.all(np.asarray(got_l[n:]) == -1) and np.all(np.asarray(got_s[n:]) == 0)
  # padded RoIs give nothing
  valid = np.arange(P) < 30
  want = np_multiclass_nms(b[:30], s[:30], 0.05, 0.5, 40)
  got = boxes.multiclass_nms(jnp.asarray(b), jnp.asarray(s), score_thr=0.05, iou_threshold=0.5,
                             max_per_img=40, max_candidates=P * C, valid_P=jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(got[2][:len(want[2])]), want[2])
  assert int(got[3].sum()) == len(want[2])


# ------------------------------------------------------------------------------------------------
# Shape errors.


def test_bad_shapes_raise_naming_the_argument():
  b4, b3 = jnp.zeros((5, 4)), jnp.zeros((5, 3))
  s = jnp.zeros((5,))
  cases = [
      ("boxes1_N4", lambda: boxes.iou(b3, b4)),
      ("boxes2_M4", lambda: boxes.iou(b4, jnp.zeros((2, 5, 4)))),
      ("targets_N4", lambda: boxes.encode(b4, jnp.zeros((4, 4)))),
      ("deltas_N4", lambda: boxes.decode(b4, jnp.zeros((5, 6)))),
      ("means", lambda: boxes.decode(b4, b4, means=(0, 0))),
      ("feature_sizes", lambda: boxes.anchors([(4, 4)], (4, 8))),
      ("scores_N", lambda: boxes.nms(b4, jnp.zeros((4,)), 0.5, 3)),
      ("valid_N", lambda: boxes.nms(b4, s, 0.5, 3, jnp.ones((5, 1), bool))),
      ("idxs_N", lambda: boxes.batched_nms(b4, s, jnp.zeros((6,), int), 0.5, 3)),
      ("max_out", lambda: boxes.nms(b4, s, 0.5, 0)),
  ]
  for name, call in cases:
    with pytest.raises(ValueError, match=name):
      call()
