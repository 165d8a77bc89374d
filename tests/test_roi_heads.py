"""models/roi_heads.py: the heads' forward against NumPy loops with torch's layouts (the (C, 7, 7)
flatten of the box head's fc input, ConvTranspose2d's (in, out, kh, kw) weight), their inits; the
box targets and losses against a NumPy transcription of mmdetection 3.x's BBoxHead
_get_target_single / loss on the sampled proposals (dynamic shapes, positives first); the mask
targets against a NumPy loop, and against mmdet's full-bitmap targets on a disc (how far the
crop representation departs); the mask loss against mmdet's mask_cross_entropy; padding, jit and
vmap."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaptor_jax.models import boxes, roi_heads, targets

EPS = np.finfo(np.float32).eps
RCNN = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5)


def _set(param, value):
  param[...] = jnp.asarray(value, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Heads.


def test_bbox_head_flattens_in_torch_order():
  rng = np.random.default_rng(0)
  c, fc, classes, k = 3, 8, 4, 5
  head = roi_heads.BBoxHead(c, 7, fc, classes, rngs=nnx.Rngs(0))
  # Torch's fc weight (out, C * 49), its input index c * 49 + y * 7 + x; nnx holds its transpose.
  w1 = rng.normal(size=(fc, c * 49)).astype(np.float32)
  _set(head.shared_fcs[0].kernel, w1.T)
  biases = [rng.normal(size=n).astype(np.float32) for n in (fc, fc, classes + 1, 4 * classes)]
  layers = [head.shared_fcs[0], head.shared_fcs[1], head.fc_cls, head.fc_reg]
  for layer, b in zip(layers, biases):
    _set(layer.bias, b)
  x = rng.normal(size=(k, 7, 7, c)).astype(np.float32)
  cls, reg = jax.jit(lambda m, x: m(x))(head, jnp.asarray(x))
  assert cls.shape == (k, classes + 1) and reg.shape == (k, 4 * classes)
  h = np.zeros((k, fc))
  for i in range(k):
    for o in range(fc):
      h[i, o] = sum(w1[o, ci * 49 + y * 7 + xx] * x[i, y, xx, ci]
                    for ci in range(c) for y in range(7) for xx in range(7))
  h = np.maximum(h + biases[0], 0)
  h = np.maximum(h @ np.asarray(layers[1].kernel[...]) + biases[1], 0)
  np.testing.assert_allclose(cls, h @ np.asarray(head.fc_cls.kernel[...]) + biases[2],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(reg, h @ np.asarray(head.fc_reg.kernel[...]) + biases[3],
                             rtol=1e-4, atol=1e-4)


def test_bbox_head_init():
  head = roi_heads.BBoxHead(16, 7, 256, 80, rngs=nnx.Rngs(1))
  k0 = np.asarray(head.shared_fcs[0].kernel[...])
  limit = np.sqrt(6 / (16 * 49 + 256))  # Xavier uniform, gain 1
  assert np.abs(k0).max() <= limit and np.abs(k0).max() > 0.99 * limit
  np.testing.assert_allclose(k0.std(), limit / np.sqrt(3), rtol=0.02)
  np.testing.assert_allclose(np.asarray(head.fc_cls.kernel[...]).std(), 0.01, rtol=0.05)
  np.testing.assert_allclose(np.asarray(head.fc_reg.kernel[...]).std(), 0.001, rtol=0.05)
  for layer in (*head.shared_fcs, head.fc_cls, head.fc_reg):
    assert not np.asarray(layer.bias[...]).any()


def np_conv3x3(x_hwc, k_33io, b):
  h, w, _ = x_hwc.shape
  pad = np.pad(x_hwc, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((h, w, k_33io.shape[3]))
  for y in range(h):
    for xx in range(w):
      for dy in range(3):
        for dx in range(3):
          out[y, xx] += pad[y + dy, xx + dx] @ k_33io[dy, dx]
  return out + b


def np_deconv2x2(x_hwc, w_torch_coab, b):
  """torch's ConvTranspose2d(kernel 2, stride 2), weight (in, out, 2, 2), by its definition."""
  h, w, _ = x_hwc.shape
  out = np.zeros((2 * h, 2 * w, w_torch_coab.shape[1]))
  for i in range(h):
    for j in range(w):
      for a in range(2):
        for bb in range(2):
          for c in range(x_hwc.shape[2]):
            out[2 * i + a, 2 * j + bb] += x_hwc[i, j, c] * w_torch_coab[c, :, a, bb]
  return out + b


def test_mask_head_forward_and_deconv_layout():
  rng = np.random.default_rng(2)
  cin, ch, classes, k, s = 3, 4, 2, 2, 3
  head = roi_heads.MaskHead(cin, ch, 4, classes, rngs=nnx.Rngs(0))
  for conv in head.convs:
    _set(conv.bias, rng.normal(size=ch) * 0.1)
  w_torch = rng.normal(size=(ch, ch, 2, 2)).astype(np.float32)  # (in, out, kh, kw)
  _set(head.upsample.kernel, w_torch.transpose(2, 3, 1, 0))     # the documented import
  _set(head.upsample.bias, rng.normal(size=ch))
  _set(head.conv_logits.bias, rng.normal(size=classes))
  x = rng.normal(size=(k, s, s, cin)).astype(np.float32)
  got = jax.jit(lambda m, x: m(x))(head, jnp.asarray(x))
  assert got.shape == (k, 2 * s, 2 * s, classes)
  for i in range(k):
    h = x[i].astype(np.float64)
    for conv in head.convs:
      h = np.maximum(np_conv3x3(h, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])), 0)
    h = np.maximum(np_deconv2x2(h, w_torch, np.asarray(head.upsample.bias[...])), 0)
    want = h @ np.asarray(head.conv_logits.kernel[...])[0, 0] + np.asarray(
        head.conv_logits.bias[...])
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4)


def test_mask_head_init():
  head = roi_heads.MaskHead(16, 32, 4, 8, rngs=nnx.Rngs(3))
  # Kaiming normal fan_out: torch's fan_out is weight.size(0) * kh * kw: out * 9 for the convs,
  # in * 4 for ConvTranspose2d's (in, out, 2, 2), num_classes for conv_logits.
  for conv in head.convs:
    np.testing.assert_allclose(np.asarray(conv.kernel[...]).std(), np.sqrt(2 / (32 * 9)),
                               rtol=0.06)
  assert head.upsample.kernel[...].shape == (2, 2, 32, 32)
  np.testing.assert_allclose(np.asarray(head.upsample.kernel[...]).std(), np.sqrt(2 / (32 * 4)),
                             rtol=0.06)
  np.testing.assert_allclose(np.asarray(head.conv_logits.kernel[...]).std(), np.sqrt(2 / 8),
                             rtol=0.15)
  for layer in (*head.convs, head.upsample, head.conv_logits):
    assert not np.asarray(layer.bias[...]).any()


def test_head_errors():
  head = roi_heads.BBoxHead(4, 7, 8, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="x_KhwC"):
    head(jnp.zeros((2, 7, 7, 5)))
  mask = roi_heads.MaskHead(4, 4, 1, 3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="x_KhwC"):
    mask(jnp.zeros((2, 14, 14, 5)))


# ------------------------------------------------------------------------------------------------
# Box targets and loss.


def _image(rng, p=40, g=5, n_pad=2, classes=4):
  """An image's gts (the last n_pad padded with junk), proposals near them and random ones (a few
  invalid), assigned, with gts added, sampled (16 at 0.25)."""
  xy = rng.uniform(0, 60, (g, 2))
  gt = np.concatenate([xy, xy + rng.uniform(8, 40, (g, 2))], 1).astype(np.float32)
  gt_valid = np.arange(g) < g - n_pad
  gt[~gt_valid] = rng.uniform(-5, 5, ((~gt_valid).sum(), 4))  # junk, not zeros
  labels = rng.integers(0, classes, g).astype(np.int32)
  src = gt[rng.integers(0, g - n_pad, p)]
  wh = src[:, 2:] - src[:, :2]
  props = src + rng.normal(0, 0.15, (p, 4)) * np.concatenate([wh, wh], 1)
  props[p // 2:, :2] = rng.uniform(0, 80, (p - p // 2, 2))
  props[p // 2:, 2:] = props[p // 2:, :2] + rng.uniform(4, 40, (p - p // 2, 2))
  props = np.concatenate([np.minimum(props[:, :2], props[:, 2:] - 1), props[:, 2:]], 1)
  props = props.astype(np.float32)
  valid = rng.random(p) > 0.1
  props[~valid] = 0
  key = jax.random.key(int(rng.integers(1 << 30)))
  props, valid, assigned, pos, neg = map(np.asarray, _assign_and_sample(key, props, valid, gt,
                                                                        gt_valid))
  return props, valid, assigned, pos, neg, gt, labels


@jax.jit
def _assign_and_sample(key, props, valid, gt, gt_valid):
  assigned = targets.max_iou_assign(boxes.iou(props, gt), gt_valid, valid_N=valid, **RCNN)
  props, valid, assigned = targets.add_gt_as_proposals(props, valid, assigned, gt, gt_valid)
  pos, neg = targets.sample(key, assigned, valid, num=16, pos_fraction=0.25)
  return props, valid, assigned, pos, neg


def np_encode(p, g, stds=(0.1, 0.1, 0.2, 0.2)):
  p, g = p.astype(np.float64), g.astype(np.float64)
  pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
  gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
  d = np.stack([((g[:, 0] + g[:, 2]) - (p[:, 0] + p[:, 2])) / 2 / pw,
                ((g[:, 1] + g[:, 3]) - (p[:, 1] + p[:, 3])) / 2 / ph,
                np.log(gw / pw), np.log(gh / ph)], 1)
  return d / np.asarray(stds)


def np_get_target_single(props, assigned, pos, neg, gt, labels, classes):
  """mmdet's _get_target_single: rows positives first, then negatives."""
  pi, ni = np.flatnonzero(pos), np.flatnonzero(neg)
  n = len(pi) + len(ni)
  lab = np.full(n, classes, np.int64)
  lw, bt, bw = np.zeros(n), np.zeros((n, 4)), np.zeros((n, 4))
  lab[:len(pi)] = labels[assigned[pi] - 1]
  lw[:len(pi)] = 1
  bt[:len(pi)] = np_encode(props[pi], gt[assigned[pi] - 1])
  bw[:len(pi)] = 1
  lw[len(pi):] = 1
  return pi, ni, lab, lw, bt, bw


def np_bbox_loss(cls, reg, lab, lw, bt, bw, classes):
  """mmdet's BBoxHead.loss with CrossEntropyLoss and L1Loss (weights 1)."""
  cls = cls.astype(np.float64)
  avg = max(float((lw > 0).sum()), 1.0)
  m = cls.max(1, keepdims=True)
  lse = (m + np.log(np.exp(cls - m).sum(1, keepdims=True)))[:, 0]
  ce = lse - cls[np.arange(len(lab)), lab]
  loss_cls = (ce * lw).sum() / (avg + EPS)
  pos = (lab >= 0) & (lab < classes)
  if not pos.any():
    return loss_cls, 0.0
  pred = reg.reshape(len(reg), -1, 4)[pos, lab[pos]].astype(np.float64)
  loss_bbox = (np.abs(pred - bt[pos]) * bw[pos]).sum() / (bt.shape[0] + EPS)
  return loss_cls, loss_bbox


def test_bbox_targets_and_loss_match_mmdet_over_a_batch():
  rng = np.random.default_rng(4)
  classes = 4
  images = [_image(rng, classes=classes) for _ in range(2)]
  fn = jax.jit(functools.partial(roi_heads.bbox_targets, num_classes=classes))
  outs, oracle = [], []
  for props, valid, assigned, pos, neg, gt, labels in images:
    assert pos.sum() > 0 and neg.sum() > 0
    lab, lw, bt, bw = map(np.asarray, fn(props, valid, assigned, pos, neg, gt, labels))
    pi, ni, w_lab, w_lw, w_bt, w_bw = np_get_target_single(props, assigned, pos, neg, gt,
                                                           labels, classes)
    rows = np.concatenate([pi, ni])
    np.testing.assert_array_equal(lab[rows], w_lab)
    np.testing.assert_array_equal(lw[rows], w_lw)
    np.testing.assert_allclose(bt[rows], w_bt, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(bw[rows], w_bw[:, 0])
    rest = np.setdiff1d(np.arange(len(props)), rows)
    assert (lab[rest] == classes).all() and not lw[rest].any() and not bt[rest].any()
    assert not bw[rest].any()
    outs.append((lab, lw, bt, bw))
    oracle.append((rows, w_lab, w_lw, w_bt, w_bw))
  p = len(images[0][0])
  cls = rng.normal(0, 2, (2, p, classes + 1)).astype(np.float32)
  reg = rng.normal(0, 1, (2, p, 4 * classes)).astype(np.float32)
  stack = lambda i: jnp.asarray(np.stack([o[i] for o in outs]))
  got = jax.jit(roi_heads.bbox_loss)(cls, reg, stack(0), stack(1), stack(2), stack(3))
  # mmdet: the batch's sampled rows concatenated, image by image.
  cat = lambda j: np.concatenate([o[j] for o in oracle])
  rows = [o[0] for o in oracle]
  want = np_bbox_loss(np.concatenate([cls[b][rows[b]] for b in range(2)]),
                      np.concatenate([reg[b][rows[b]] for b in range(2)]), cat(1), cat(2),
                      cat(3), cat(4), classes)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5)
  # The sums of the images, divided once, are the batch's loss.
  sums = [roi_heads.bbox_loss_sums(cls[b], reg[b], *outs[b]) for b in range(2)]
  total = [sum(s[i] for s in sums) for i in range(4)]
  np.testing.assert_allclose(roi_heads.bbox_loss_divide(*total), np.asarray(got), rtol=1e-6)
  # vmap of the targets over the batch is the per-image targets.
  vm = jax.jit(jax.vmap(functools.partial(roi_heads.bbox_targets, num_classes=classes)))(
      *(jnp.asarray(np.stack([im[i] for im in images])) for i in range(7)))
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(vm[i]), np.stack([o[i] for o in outs]))


def test_bbox_loss_ignores_unsampled_and_padding():
  rng = np.random.default_rng(5)
  classes = 4
  props, valid, assigned, pos, neg, gt, labels = _image(rng, classes=classes)
  tg = roi_heads.bbox_targets(props, valid, assigned, pos, neg, gt, labels, num_classes=classes)
  p = len(props)
  cls = rng.normal(0, 2, (p, classes + 1)).astype(np.float32)
  reg = rng.normal(0, 1, (p, 4 * classes)).astype(np.float32)
  sampled = pos | neg
  junk_cls, junk_reg = cls.copy(), reg.copy()
  junk_cls[~sampled] = 1e4
  junk_reg[~sampled] = -1e4
  junk_reg[pos] += np.where(np.repeat(np.arange(classes), 4)[None] == np.asarray(tg[0])[pos, None],
                            0, 1e4).astype(np.float32)  # other classes' deltas don't count
  a = roi_heads.bbox_loss(cls, reg, *tg)
  b = roi_heads.bbox_loss(junk_cls, junk_reg, *tg)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  grads = jax.grad(lambda c, r: sum(roi_heads.bbox_loss(c, r, *tg)), (0, 1))(
      jnp.asarray(cls), jnp.asarray(reg))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  assert not np.asarray(grads[0])[~sampled].any() and not np.asarray(grads[1])[~pos].any()
  # Nothing sampled: both losses 0 (mmdet: avg_factor floored at 1, bbox_pred[pos].sum()).
  none = np.zeros(p, bool)
  tg0 = roi_heads.bbox_targets(props, valid, assigned, none, none, gt, labels,
                               num_classes=classes)
  np.testing.assert_array_equal(np.asarray(roi_heads.bbox_loss(cls, reg, *tg0)), [0.0, 0.0])


def test_bbox_errors():
  z = jnp.zeros
  with pytest.raises(ValueError, match="pos_P"):
    roi_heads.bbox_targets(z((4, 4)), z(4, bool), z(4, jnp.int32), z(3, bool), z(4, bool),
                           z((2, 4)), z(2, jnp.int32))
  with pytest.raises(ValueError, match="gt_labels_G"):
    roi_heads.bbox_targets(z((4, 4)), z(4, bool), z(4, jnp.int32), z(4, bool), z(4, bool),
                           z((2, 4)), z(3, jnp.int32))
  with pytest.raises(ValueError, match="deltas_P4C"):
    roi_heads.bbox_loss(z((4, 5)), z((4, 12)), z(4, jnp.int32), z(4), z((4, 4)), z(4))


# ------------------------------------------------------------------------------------------------
# Mask targets.


def np_resample(prop, gbox, crop, s):
  """The documented resampling, one proposal, plain loops."""
  m = crop.shape[0]
  out = np.zeros((s, s))
  gw, gh = gbox[2] - gbox[0], gbox[3] - gbox[1]
  for py in range(s):
    v = prop[1] + (py + 0.5) * (prop[3] - prop[1]) / s
    for px in range(s):
      u = prop[0] + (px + 0.5) * (prop[2] - prop[0]) / s
      if not (gbox[0] <= u <= gbox[2] and gbox[1] <= v <= gbox[3]):
        continue
      cx = min(max((u - gbox[0]) * m / gw - 0.5, 0), m - 1)
      cy = min(max((v - gbox[1]) * m / gh - 0.5, 0), m - 1)
      x0, y0 = int(np.floor(cx)), int(np.floor(cy))
      x1, y1 = min(x0 + 1, m - 1), min(y0 + 1, m - 1)
      fx, fy = cx - x0, cy - y0
      out[py, px] = ((1 - fy) * ((1 - fx) * crop[y0, x0] + fx * crop[y0, x1])
                     + fy * ((1 - fx) * crop[y1, x0] + fx * crop[y1, x1]))
  return out


@pytest.mark.parametrize("m", [28, 56])
def test_mask_targets_match_loop(m):
  rng = np.random.default_rng(m)
  props, valid, assigned, pos, neg, gt, labels = _image(rng, p=24)
  crops = (rng.random((len(gt), m, m)) < 0.5).astype(np.float32)
  got = np.asarray(jax.jit(roi_heads.mask_targets, static_argnums=5)(
      props, pos, assigned, gt, crops, 12))
  soft = np.asarray(roi_heads.resample_crops(props, gt[np.maximum(assigned - 1, 0)],
                                             crops[np.maximum(assigned - 1, 0)], 12))
  assert got.shape == (len(props), 12, 12) and pos.sum() > 0
  for i in range(len(props)):
    if not pos[i]:
      assert not got[i].any()
      continue
    want = np_resample(props[i].astype(np.float64), gt[assigned[i] - 1].astype(np.float64),
                       crops[assigned[i] - 1], 12)
    np.testing.assert_allclose(soft[i], want, atol=2e-5)
    clear = np.abs(want - 0.5) > 1e-4
    np.testing.assert_array_equal(got[i][clear], (want >= 0.5)[clear])
  # vmap over a batch is per-image.
  vm = jax.vmap(lambda *a: roi_heads.mask_targets(*a, mask_size=12))(
      *(jnp.asarray(np.stack([x, x])) for x in (props, pos, assigned, gt, crops)))
  np.testing.assert_array_equal(np.asarray(vm[1]), got)


def np_roi_align_adaptive(bitmap, box, s):
  """torchvision roi_align(aligned=True, spatial_scale 1, sampling_ratio 0) of one channel:
  ceil(roi size / s) samples per bin axis, torchvision's bilinear edge rules. Separable."""
  def axis(lo, hi, size):
    start, length = lo - 0.5, hi - lo
    bins, grid = length / s, max(int(np.ceil(length / s)), 1)
    a = np.zeros((s, size))
    for p in range(s):
      for i in range(grid):
        c = start + p * bins + (i + 0.5) * bins / grid
        if c < -1 or c > size:
          continue
        c = max(c, 0.0)
        low = int(c)
        if low >= size - 1:
          a[p, size - 1] += 1 / grid
          continue
        a[p, low] += (1 - (c - low)) / grid
        a[p, low + 1] += (c - low) / grid
    return a
  ay = axis(box[1], box[3], bitmap.shape[0])
  ax = axis(box[0], box[2], bitmap.shape[1])
  return ay @ bitmap @ ax.T


def test_mask_target_departure_from_full_bitmap():
  """Our targets from an M x M crop against mmdet's from the full bitmap, on a disc; the numbers
  quoted in mask_targets' docstring (printed with -s)."""
  rng = np.random.default_rng(7)
  cx, cy, r = 100.3, 90.7, 40.0
  yy, xx = np.mgrid[:200, :200] + 0.5
  bitmap = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float64)
  rows, cols = np.flatnonzero(bitmap.any(1)), np.flatnonzero(bitmap.any(0))
  gt = np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
  wh = gt[2:] - gt[:2]
  props = []
  while len(props) < 24:
    b = gt + rng.normal(0, 0.15, 4) * np.concatenate([wh, wh])
    if b[2] - b[0] > 4 and b[3] - b[1] > 4 and float(boxes.iou(
        jnp.asarray(b[None], jnp.float32), jnp.asarray(gt[None]))[0, 0]) >= 0.5:
      props.append(b)
  props = np.asarray(props, np.float32)
  exact = np.stack([np_roi_align_adaptive(bitmap, p.astype(np.float64), 28) >= 0.5
                    for p in props])
  n = len(props)
  stats = {}
  for m in (28, 56):
    crop = (np_roi_align_adaptive(bitmap, gt.astype(np.float64), m) >= 0.5).astype(np.float32)
    ours = np.asarray(roi_heads.mask_targets(props, np.ones(n, bool), np.ones(n, np.int32),
                                             gt[None], crop[None])) > 0
    iou = (ours & exact).sum((1, 2)) / (ours | exact).sum((1, 2))
    stats[m] = (iou.mean(), iou.min())
  print(f"mask target IoU vs full bitmap (mean, min): M=28 {stats[28]}, M=56 {stats[56]}")
  assert stats[28][0] > 0.95 and stats[56][0] > stats[28][0] - 0.005
  assert stats[56][1] > 0.95


# ------------------------------------------------------------------------------------------------
# Mask loss.


def np_mask_loss(logits, labels, targets):
  """mmdet's mask_cross_entropy on the positives: BCE with logits, reduction='mean'."""
  x = logits[np.arange(len(labels)), :, :, labels].astype(np.float64)
  z = targets.astype(np.float64)
  return (np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))).mean()


def test_mask_loss_matches_mmdet_over_a_batch():
  rng = np.random.default_rng(8)
  b, p, s, c = 2, 6, 28, 3
  logits = rng.normal(0, 3, (b, p, s, s, c)).astype(np.float32)
  labels = rng.integers(0, c, (b, p)).astype(np.int32)
  pos = rng.random((b, p)) < 0.5
  pos[:, 0] = True
  labels[~pos] = c  # background, as bbox_targets gives
  tgt = (rng.random((b, p, s, s)) < 0.4).astype(np.float32)
  tgt[~pos] = 0
  got = jax.jit(roi_heads.mask_loss)(logits, labels, pos, tgt)
  want = np_mask_loss(logits[pos], labels[pos], tgt[pos])  # the batch's positives, concatenated
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  junk = logits.copy()
  junk[~pos] = 1e4
  np.testing.assert_allclose(float(roi_heads.mask_loss(junk, labels, pos, tgt)), float(got),
                             rtol=1e-6)
  grad = jax.grad(roi_heads.mask_loss)(jnp.asarray(logits), labels, pos, tgt)
  assert not np.asarray(grad)[~pos].any() and np.isfinite(np.asarray(grad)).all()
  assert float(roi_heads.mask_loss(logits, labels, np.zeros((b, p), bool), tgt)) == 0.0
  with pytest.raises(ValueError, match="targets_PSS"):
    roi_heads.mask_loss(logits, labels, pos, tgt[..., :-1])
