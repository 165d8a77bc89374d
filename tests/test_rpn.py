"""models/rpn.py: the head's output order and the static proposals against a NumPy transcription
of mmdetection's RPNHead._predict_by_feat_single and _bbox_post_process (dynamic shapes: sort,
top nms_pre per level, decode, clip, drop empty boxes, NMS per level, the best max_per_img)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptor_jax.models import boxes, rpn


def greedy_nms_np(boxes_N4, scores_N, thr):
  order = sorted(range(len(scores_N)), key=lambda i: (-scores_N[i], i))
  keep = []
  for i in order:
    ok = True
    for j in keep:
      x1, y1 = max(boxes_N4[i, 0], boxes_N4[j, 0]), max(boxes_N4[i, 1], boxes_N4[j, 1])
      x2, y2 = min(boxes_N4[i, 2], boxes_N4[j, 2]), min(boxes_N4[i, 3], boxes_N4[j, 3])
      inter = max(x2 - x1, 0) * max(y2 - y1, 0)
      area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
      union = area(boxes_N4[i]) + area(boxes_N4[j]) - inter
      if union > 0 and inter / union > thr:
        ok = False
        break
    if ok:
      keep.append(i)
  return keep


def decode_np(anchors_N4, deltas_N4, hw):
  ctr = (anchors_N4[:, :2] + anchors_N4[:, 2:]) / 2
  wh = anchors_N4[:, 2:] - anchors_N4[:, :2]
  dwh = np.clip(deltas_N4[:, 2:], -abs(np.log(16 / 1000)), abs(np.log(16 / 1000)))
  c, s = ctr + wh * deltas_N4[:, :2], wh * np.exp(dwh)
  out = np.concatenate([c - s / 2, c + s / 2], 1)
  out[:, 0::2] = np.clip(out[:, 0::2], 0, hw[1])
  out[:, 1::2] = np.clip(out[:, 1::2], 0, hw[0])
  return out


def proposals_np(levels, anchors, hw, nms_pre, max_per_img, thr):
  all_boxes, all_scores = [], []
  for (logits, deltas), anc in zip(levels, anchors):
    scores = 1 / (1 + np.exp(-logits))
    order = np.argsort(-scores, kind="stable")[:nms_pre]
    b = decode_np(anc[order], deltas[order], hw)
    s = scores[order]
    ok = ((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)
    b, s = b[ok], s[ok]
    keep = greedy_nms_np(b, s, thr)
    all_boxes.append(b[keep])
    all_scores.append(s[keep])
  b, s = np.concatenate(all_boxes), np.concatenate(all_scores)
  order = np.argsort(-s, kind="stable")[:max_per_img]
  return b[order], s[order]


def test_head_outputs_follow_the_anchors_order():
  head = rpn.RPNHead(channels=8, num_anchors=3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 8))
  (logits, deltas), = head([x])
  assert logits.shape == (2, 5 * 7 * 3) and deltas.shape == (2, 5 * 7 * 3, 4)
  hidden = jax.nn.relu(head.rpn_conv(x))
  cls = head.rpn_cls(hidden)  # (2, 5, 7, 3): location (y, x), anchor a -> (y W + x) A + a
  np.testing.assert_array_equal(np.asarray(logits[1, (2 * 7 + 4) * 3 + 1]),
                                np.asarray(cls[1, 2, 4, 1]))


def test_proposals_match_mmdets_procedure():
  rng = np.random.default_rng(0)
  hw = (50.0, 70.0)  # the image inside a 64 x 96 canvas
  sizes = [(16, 24), (8, 12), (4, 6)]
  anchors = [np.asarray(a) for a in boxes.anchors(sizes, strides=(4, 8, 16))]
  levels = [(rng.normal(size=len(a)).astype(np.float32),
             (rng.normal(size=(len(a), 4)) * 0.5).astype(np.float32)) for a in anchors]
  levels[2][1][:5, 2] = -30.0  # collapsed widths: dropped as empty after clipping
  got_boxes, got_scores, valid = jax.jit(lambda lv, an, hw: rpn.proposals(
      lv, an, hw, nms_pre=300, max_per_img=200, iou_threshold=0.7))(
          levels, anchors, jnp.asarray(hw))
  want_boxes, want_scores = proposals_np(levels, anchors, hw, 300, 200, 0.7)
  n = len(want_scores)
  assert int(valid.sum()) == n and bool(valid[:n].all())
  np.testing.assert_allclose(np.asarray(got_scores[:n]), want_scores, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got_boxes[:n]), want_boxes, rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(got_boxes[n:]) == 0) and np.all(np.isneginf(got_scores[n:]))


def test_proposals_with_few_candidates_pad_the_rest():
  anchors = [np.asarray(a) for a in boxes.anchors([(2, 2)], strides=(16,))]
  levels = [(np.linspace(-1, 1, 12).astype(np.float32), np.zeros((12, 4), np.float32))]
  got_boxes, got_scores, valid = rpn.proposals(levels, anchors, jnp.asarray((32.0, 32.0)),
                                               nms_pre=1000, max_per_img=50)
  want_boxes, want_scores = proposals_np(levels, anchors, (32.0, 32.0), 1000, 50, 0.7)
  n = len(want_scores)
  assert got_boxes.shape == (50, 4) and int(valid.sum()) == n < 12
  np.testing.assert_allclose(np.asarray(got_boxes[:n]), want_boxes, rtol=1e-5, atol=1e-4)
