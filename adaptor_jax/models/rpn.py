"""The region proposal network of Mask R-CNN as mmdetection builds it (mmdet/models/dense_heads/
rpn_head.py with mask-rcnn_r50_fpn's settings), channels last and with static shapes:

  head        on every FPN level, shared: a 3x3 convolution and ReLU, then a 1x1 convolution to
              A objectness logits (sigmoid: one class) and one to 4 A box deltas per location;
              weights normal(0, 0.01), biases zero
  proposals   per image and level: the nms_pre highest-scoring anchors (top-k), their deltas
              decoded (DeltaXYWHBBoxCoder, means 0, stds 1) and clipped to the image; boxes of
              zero width or height dropped (min_bbox_size 0); NMS at iou_threshold within each
              level; then the max_per_img best over all levels (mmdet's batched_nms with the
              level as the class)

The logits of location (y, x) and anchor a come at index (y W + x) A + a, the anchors' order
(boxes.anchors). Static shapes: a level keeps min(nms_pre, H W A) candidates, every NMS returns
max_per_img slots, and a slot that holds no box (fewer candidates, dropped or suppressed ones)
has valid False, score -inf and a zero box.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from adaptor_jax.models import boxes

NORMAL = nnx.initializers.normal(0.01)


def _conv(din, dout, kernel, *, dtype, rngs):
  pad = kernel // 2
  return nnx.Conv(din, dout, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                  kernel_init=NORMAL, bias_init=nnx.initializers.zeros, rngs=rngs)


class RPNHead(nnx.Module):
  """Returns per level (objectness logits (B, H W A), deltas (B, H W A, 4)), float32."""

  def __init__(self, channels=256, num_anchors=3, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.rpn_conv = _conv(channels, channels, 3, dtype=dtype, rngs=rngs)
    self.rpn_cls = _conv(channels, num_anchors, 1, dtype=dtype, rngs=rngs)
    self.rpn_reg = _conv(channels, 4 * num_anchors, 1, dtype=dtype, rngs=rngs)

  def __call__(self, features):
    out = []
    for x_BHWC in features:
      x_BHWC = jax.nn.relu(self.rpn_conv(x_BHWC))
      batch = x_BHWC.shape[0]
      out.append((self.rpn_cls(x_BHWC).reshape(batch, -1).astype(jnp.float32),
                  self.rpn_reg(x_BHWC).reshape(batch, -1, 4).astype(jnp.float32)))
    return out


def proposals(levels, anchors, image_hw, *, nms_pre, max_per_img, iou_threshold=0.7):
  """One image's proposals. levels: per level (logits (N_l,), deltas (N_l, 4)); anchors: per
  level (N_l, 4); image_hw: the image's (height, width) before padding, where boxes are
  clipped. Returns (boxes (max_per_img, 4), scores (max_per_img,), valid (max_per_img,)),
  best first."""
  kept_boxes, kept_scores, kept_valid = [], [], []
  for (logits_N, deltas_N4), anchors_N4 in zip(levels, anchors):
    k = min(nms_pre, logits_N.shape[0])
    scores_K, top_K = jax.lax.top_k(jax.nn.sigmoid(logits_N), k)
    boxes_K4 = boxes.decode(anchors_N4[top_K], deltas_N4[top_K], max_shape=image_hw)
    valid_K = ((boxes_K4[:, 2] - boxes_K4[:, 0]) > 0) & ((boxes_K4[:, 3] - boxes_K4[:, 1]) > 0)
    keep, keep_valid = boxes.nms(boxes_K4, scores_K, iou_threshold, max_per_img, valid_K)
    kept_boxes.append(jnp.where(keep_valid[:, None], boxes_K4[keep], 0.0))
    kept_scores.append(jnp.where(keep_valid, scores_K[keep], -jnp.inf))
    kept_valid.append(keep_valid)
  scores = jnp.concatenate(kept_scores)
  best, order = jax.lax.top_k(scores, max_per_img)
  valid = jnp.concatenate(kept_valid)[order]
  return jnp.concatenate(kept_boxes)[order], best, valid
