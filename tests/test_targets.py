"""models/targets.py: the static assigner against a NumPy transcription of mmdetection 3.x's
MaxIoUAssigner.assign_wrt_overlaps (dynamic shapes: only the valid gts and candidates, a loop
over the gts for the low-quality matches); the sampler's counts, eligibility and uniformity over
many keys; the RPN loss against a NumPy computation of mmdet's AnchorHead loss from the same
sampled masks; jit and vmap over a batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptor_jax.models import boxes, targets

RPN = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
RCNN = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5)


# ------------------------------------------------------------------------------------------------
# Oracles.


def np_assign_wrt_overlaps(overlaps_GN, pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality):
  """mmdet's assign_wrt_overlaps on a (k gts, n candidates) float32 matrix: gt_inds (n,)."""
  k, n = overlaps_GN.shape
  gt_inds = np.full(n, -1, np.int64)
  if k == 0 or n == 0:
    if k == 0:
      gt_inds[:] = 0
    return gt_inds
  max_overlaps = overlaps_GN.max(0)
  argmax_overlaps = overlaps_GN.argmax(0)  # first maximum
  gt_max_overlaps = overlaps_GN.max(1)
  gt_inds[(max_overlaps >= 0) & (max_overlaps < np.float32(neg_iou_thr))] = 0
  pos = max_overlaps >= np.float32(pos_iou_thr)
  gt_inds[pos] = argmax_overlaps[pos] + 1
  if match_low_quality:
    for i in range(k):
      if gt_max_overlaps[i] >= np.float32(min_pos_iou):
        gt_inds[overlaps_GN[i] == gt_max_overlaps[i]] = i + 1
  return gt_inds


def np_assign(iou_NG, gt_valid_G, valid_N, match_low_quality=True, **thr):
  """The oracle on the valid gts and candidates only (as mmdet sees them), mapped back."""
  gts = np.flatnonzero(gt_valid_G)
  cands = np.flatnonzero(valid_N)
  sub = np_assign_wrt_overlaps(iou_NG[cands][:, gts].T, match_low_quality=match_low_quality,
                               **thr)
  out = np.full(len(valid_N), -1, np.int64)
  if len(gts):
    sub = np.where(sub > 0, gts[np.maximum(sub - 1, 0)] + 1, sub)
  out[cands] = sub
  return out


def quantised_iou(rng, n, g, steps=20):
  """IoU on a grid of multiples of 1 / steps (exact ties, values at the thresholds), some gts
  scaled below every min_pos_iou."""
  iou = (rng.integers(0, steps + 1, (n, g)) / steps) ** 2
  iou = np.round(iou * steps) / steps
  low = rng.random(g) < 0.3
  iou[:, low] *= 0.2
  return np.round(iou * steps * 5) / (steps * 5)


# ------------------------------------------------------------------------------------------------
# max_iou_assign.


@pytest.mark.parametrize("thr", [RPN, RCNN], ids=["rpn", "rcnn"])
@pytest.mark.parametrize("match_low_quality", [True, False])
def test_assign_matches_mmdet(thr, match_low_quality):
  rng = np.random.default_rng(0)
  assign = jax.jit(functools.partial(targets.max_iou_assign, match_low_quality=match_low_quality,
                                     **thr))
  for trial in range(12):
    iou_NG = quantised_iou(rng, 200, 7).astype(np.float32)
    gt_valid_G = rng.random(7) < 0.7
    if trial == 0:
      gt_valid_G[:] = True
    if trial == 1:
      gt_valid_G[:] = False  # no valid gt: every valid candidate negative
    valid_N = rng.random(200) < 0.9 if trial % 2 else np.ones(200, bool)
    # Padded gts carry junk that must not matter.
    iou_NG[:, ~gt_valid_G] = rng.random((200, (~gt_valid_G).sum()))
    got = np.asarray(assign(jnp.asarray(iou_NG), jnp.asarray(gt_valid_G),
                            valid_N=jnp.asarray(valid_N)))
    want = np_assign(iou_NG, gt_valid_G, valid_N, match_low_quality, **thr)
    np.testing.assert_array_equal(got, want, err_msg=f"trial {trial}")
    if trial == 1:
      np.testing.assert_array_equal(got, np.where(valid_N, 0, -1))


def test_assign_ties_and_overwrites():
  # Candidate 0: IoU 0.9 with gts 0 and 1 (tie: gt 0). Candidate 1 is gt 2's best (0.8) but gt 0
  # is its argmax (0.85): the low-quality step moves it to gt 2. Candidate 2 ties gt 3's best
  # (0.35, both candidates 2 and 3 get it); gt 4's best is 0.2 < min_pos_iou: no match.
  iou = np.zeros((5, 5), np.float32)
  iou[0, :2] = 0.9
  iou[1, 0], iou[1, 2] = 0.85, 0.8
  iou[2, 3] = iou[3, 3] = 0.35
  iou[4, 4] = 0.2
  got = targets.max_iou_assign(jnp.asarray(iou), jnp.ones(5, bool), **RPN)
  np.testing.assert_array_equal(got, [2, 3, 4, 4, 0])
  # Without low-quality matches: candidate 0 -> gt 0 (lowest index), 1 -> gt 0, 2-3 ignored.
  got = targets.max_iou_assign(jnp.asarray(iou), jnp.ones(5, bool), match_low_quality=False,
                               **RPN)
  np.testing.assert_array_equal(got, [1, 1, -1, -1, 0])


def test_assign_thresholds_are_float32():
  iou = np.array([[0.7], [np.nextafter(np.float32(0.7), np.float32(0))], [0.3]], np.float32)
  got = targets.max_iou_assign(jnp.asarray(iou), jnp.ones(1, bool), match_low_quality=False,
                               **RPN)
  np.testing.assert_array_equal(got, [1, -1, -1])


def test_assign_errors():
  with pytest.raises(ValueError, match="iou_NG"):
    targets.max_iou_assign(jnp.zeros(3), jnp.ones(1, bool), **RPN)
  with pytest.raises(ValueError, match="gt_valid_G"):
    targets.max_iou_assign(jnp.zeros((3, 2)), jnp.ones(3, bool), **RPN)
  with pytest.raises(ValueError, match="neg_iou_thr"):
    targets.max_iou_assign(jnp.zeros((3, 2)), jnp.ones(2, bool), pos_iou_thr=0.7,
                           neg_iou_thr=(0.0, 0.3), min_pos_iou=0.3)


# ------------------------------------------------------------------------------------------------
# sample.


def _assigned(rng, n, n_pos, n_neg, n_ignored_invalid=50):
  """A shuffled assignment with n_pos positives and n_neg negatives among the valid candidates;
  invalid candidates look positive or negative but must never be sampled."""
  kinds = np.array([1] * n_pos + [0] * n_neg + [-1] * (n - n_pos - n_neg))
  valid = np.ones(n, bool)
  order = rng.permutation(n)
  assigned, valid = kinds[order], valid[order]
  spare = np.flatnonzero(assigned == -1)[:n_ignored_invalid]
  assigned[spare] = rng.integers(0, 3, len(spare))  # junk: 0, 1 or 2
  valid[spare] = False
  return assigned.astype(np.int32), valid


@pytest.mark.parametrize("n_pos,n_neg,want_pos,want_neg", [
    (300, 1000, 128, 128), (10, 1000, 10, 246), (10, 20, 10, 20), (0, 500, 0, 256),
    (200, 50, 128, 50), (0, 0, 0, 0), (128, 128, 128, 128)])
def test_sample_counts_and_eligibility(n_pos, n_neg, want_pos, want_neg):
  rng = np.random.default_rng(n_pos + 7 * n_neg)
  assigned, valid = _assigned(rng, 2000, n_pos, n_neg)
  fn = jax.jit(functools.partial(targets.sample, num=256, pos_fraction=0.5))
  for seed in range(3):
    pos, neg = map(np.asarray, fn(jax.random.key(seed), jnp.asarray(assigned), jnp.asarray(valid)))
    assert pos.sum() == want_pos and neg.sum() == want_neg
    assert np.all(valid[pos] & (assigned[pos] > 0))
    assert np.all(valid[neg] & (assigned[neg] == 0))


def test_sample_roi_head_counts():
  rng = np.random.default_rng(1)
  assigned, valid = _assigned(rng, 1100, 400, 600)
  fn = jax.jit(functools.partial(targets.sample, num=512, pos_fraction=0.25))
  pos, neg = fn(jax.random.key(0), jnp.asarray(assigned), jnp.asarray(valid))
  assert int(pos.sum()) == 128 and int(neg.sum()) == 384


def test_sample_keys_differ_and_are_uniform():
  rng = np.random.default_rng(2)
  assigned, valid = _assigned(rng, 300, 20, 60)
  keys = jax.random.split(jax.random.key(3), 4000)
  fn = jax.jit(jax.vmap(functools.partial(targets.sample, num=20, pos_fraction=0.25),
                        in_axes=(0, None, None)))
  pos, neg = map(np.asarray, fn(keys, jnp.asarray(assigned), jnp.asarray(valid)))
  assert len({p.tobytes() for p in pos[:50]}) == 50 and len({n.tobytes() for n in neg[:50]}) == 50
  # 5 of 20 positives, 15 of 60 negatives: each eligible one chosen with frequency 1/4 (a
  # standard deviation of 0.007 over 4000 keys); nothing else ever chosen.
  eligible_pos, eligible_neg = valid & (assigned > 0), valid & (assigned == 0)
  np.testing.assert_allclose(pos.mean(0)[eligible_pos], 0.25, atol=0.035)
  np.testing.assert_allclose(neg.mean(0)[eligible_neg], 0.25, atol=0.035)
  assert not pos[:, ~eligible_pos].any() and not neg[:, ~eligible_neg].any()
  # Pairs as often as independent draws without replacement would have them.
  both = (pos[:, eligible_pos][:, :, None] & pos[:, eligible_pos][:, None, :]).mean(0)
  off = both[~np.eye(20, dtype=bool)]
  np.testing.assert_allclose(off.mean(), 5 * 4 / (20 * 19), atol=0.005)


def test_sample_errors():
  with pytest.raises(ValueError, match="valid_N"):
    targets.sample(jax.random.key(0), jnp.zeros(4, jnp.int32), jnp.ones(3, bool), num=2,
                   pos_fraction=0.5)
  with pytest.raises(ValueError, match="num"):
    targets.sample(jax.random.key(0), jnp.zeros(4, jnp.int32), jnp.ones(4, bool), num=2.5,
                   pos_fraction=0.5)


# ------------------------------------------------------------------------------------------------
# The RPN loss.


def _image(rng, g=6, hw=(64, 64)):
  anchors_N4 = np.asarray(jnp.concatenate(boxes.anchors(
      [(hw[0] // s, hw[1] // s) for s in (4, 8, 16, 32, 64)])))
  n = len(anchors_N4)
  xy = rng.uniform(0, 40, (g, 2))
  wh = rng.uniform(6, 30, (g, 2))
  gt_G4 = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  gt_valid_G = np.arange(g) < g - 2
  gt_G4[~gt_valid_G] = 0  # padding
  valid_N = np.ones(n, bool)
  valid_N[rng.random(n) < 0.1] = False  # as if outside the padded image
  logits_N = rng.normal(0, 2, n).astype(np.float32)
  deltas_N4 = rng.normal(0, 0.5, (n, 4)).astype(np.float32)
  return anchors_N4, valid_N, logits_N, deltas_N4, gt_G4, gt_valid_G


def np_rpn_sums(anchors, logits, deltas, gt, assigned, pos, neg):
  """mmdet's RPN loss terms from sampled masks, float64: labels 0 (foreground) on positives
  -> one-hot target 1, the background label -> 0; label weight 1 on sampled anchors; bbox
  weight 1 on positives; L1 on encoded targets (means 0, stds 1)."""
  x = logits.astype(np.float64)
  z = pos.astype(np.float64)
  bce = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
  loss_cls = bce[pos | neg].sum()
  a, t = anchors[pos].astype(np.float64), gt[assigned[pos] - 1].astype(np.float64)
  aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  tw, th = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
  enc = np.stack([((t[:, 0] + t[:, 2]) - (a[:, 0] + a[:, 2])) / 2 / aw,
                  ((t[:, 1] + t[:, 3]) - (a[:, 1] + a[:, 3])) / 2 / ah,
                  np.log(tw / aw), np.log(th / ah)], 1)
  loss_bbox = np.abs(deltas[pos].astype(np.float64) - enc).sum()
  avg = max(pos.sum(), 1) + max(neg.sum(), 1)
  return loss_cls, loss_bbox, avg


def test_rpn_targets_and_loss():
  rng = np.random.default_rng(4)
  anchors, valid, logits, deltas, gt, gt_valid = _image(rng)
  key = jax.random.key(5)
  assigned, pos, neg = map(np.asarray, jax.jit(targets.rpn_targets)(
      key, anchors, valid, gt, gt_valid))
  iou = np.asarray(boxes.iou(jnp.asarray(anchors), jnp.asarray(gt)))
  np.testing.assert_array_equal(assigned, np_assign(iou, gt_valid, valid, **RPN))
  assert 0 < pos.sum() <= 128 and pos.sum() + neg.sum() == 256
  sums = jax.jit(targets.rpn_loss_sums)(anchors, logits, deltas, gt, assigned, pos, neg)
  want = np_rpn_sums(anchors, logits, deltas, gt, assigned, pos, neg)
  np.testing.assert_allclose(np.asarray(sums, np.float64), want, rtol=2e-5)
  loss = jax.jit(targets.rpn_targets_and_loss)(key, anchors, valid, logits, deltas, gt, gt_valid)
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(loss, [want[0] / (want[2] + eps), want[1] / (want[2] + eps)],
                             rtol=2e-5)
  # Gradients are finite despite the padded (zero) gt boxes.
  total = lambda l, d: sum(targets.rpn_targets_and_loss(key, anchors, valid, l, d, gt, gt_valid))
  grads = jax.jit(jax.grad(total, (0, 1)))(jnp.asarray(logits), jnp.asarray(deltas))
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_rpn_no_gt_and_avg_factor_floor():
  rng = np.random.default_rng(6)
  anchors, valid, logits, deltas, gt, _ = _image(rng)
  gt_valid = np.zeros(len(gt), bool)
  assigned, pos, neg = jax.jit(targets.rpn_targets)(jax.random.key(0), anchors, valid, gt,
                                                     gt_valid)
  assert int(pos.sum()) == 0 and int(neg.sum()) == 256
  _, loss_bbox, avg = jax.jit(targets.rpn_loss_sums)(anchors, logits, deltas, gt, assigned, pos,
                                                     neg)
  assert float(loss_bbox) == 0 and float(avg) == 257  # max(0, 1) + 256, mmdet's SamplingResult


def test_rpn_loss_batch_jit_vmap():
  rng = np.random.default_rng(7)
  images = [_image(rng) for _ in range(2)]
  anchors = images[0][0]
  stack = lambda i: jnp.asarray(np.stack([im[i] for im in images]))
  key = jax.random.key(8)
  loss = jax.jit(targets.rpn_loss_batch)(key, anchors, stack(1), stack(2), stack(3), stack(4),
                                         stack(5))
  totals = np.zeros(3)
  for b, (_, valid, logits, deltas, gt, gt_valid) in enumerate(images):
    assigned, pos, neg = map(np.asarray, jax.jit(targets.rpn_targets)(
        jax.random.fold_in(key, b), anchors, valid, gt, gt_valid))
    totals += np_rpn_sums(anchors, logits, deltas, gt, assigned, pos, neg)
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(loss, totals[:2] / (totals[2] + eps), rtol=2e-5)
  # vmap of the one-image function: per-image losses, each its own image's.
  keys = jax.random.split(key, 2)
  per_image = jax.jit(jax.vmap(targets.rpn_targets_and_loss, in_axes=(0, None, 0, 0, 0, 0, 0)))(
      keys, anchors, stack(1), stack(2), stack(3), stack(4), stack(5))
  for b in range(2):
    one = jax.jit(targets.rpn_targets_and_loss)(keys[b], anchors, *(im for im in images[b][1:]))
    np.testing.assert_allclose(np.asarray(per_image)[:, b], np.asarray(one), rtol=1e-6)


def test_add_gt_as_proposals():
  props = jnp.asarray([[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 0, 0]], jnp.float32)
  gt = jnp.asarray([[0, 0, 10, 10], [0, 0, 0, 0]], jnp.float32)
  gt_valid = jnp.asarray([True, False])
  prop_valid = jnp.asarray([True, True, False])
  assign = jax.jit(functools.partial(targets.max_iou_assign, **RCNN))
  assigned = assign(boxes.iou(props, gt), gt_valid, valid_N=prop_valid)
  np.testing.assert_array_equal(assigned, [1, 0, -1])
  b, v, a = jax.jit(targets.add_gt_as_proposals)(props, prop_valid, assigned, gt, gt_valid)
  assert b.shape == (5, 4)
  np.testing.assert_array_equal(v, [True, False, True, True, False])
  np.testing.assert_array_equal(a, [1, -1, 1, 0, -1])
