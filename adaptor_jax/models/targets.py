"""Training targets of a two-stage detector (Mask R-CNN as mmdetection 3.x builds it, config
mask-rcnn_r50_fpn) with static shapes, so that they jit, vmap over a batch of images and compile
for TPU, as TF Model Garden's target ops do:

  max_iou_assign        mmdet's MaxIoUAssigner.assign_wrt_overlaps (gt_max_assign_all=True,
                        ignore_iof_thr=-1, a float neg_iou_thr)
  sample                mmdet's RandomSampler (neg_pos_ub=-1) as a balanced sampler: random
                        priorities and top-k (TF Model Garden's approach) instead of randperm
  add_gt_as_proposals   the RoI sampler's add_gt_as_proposals: ground truth first, each assigned
                        to itself
  rpn_targets_and_loss  mmdet's RPNHead loss (AnchorHead.loss_by_feat) for one image;
  rpn_loss_batch        the same over a batch, which is what mmdet computes per GPU

Ground truth is padded to a fixed G (gt_valid_G marks the real boxes) and candidates to a fixed
N (valid_N); padded entries never match, are never sampled and add nothing to a loss. Where
mmdet drops candidates (anchors outside the valid flags) before assigning, they are masked out
here before any maximum is taken, so the low-quality matches are those mmdet makes.

mmdet's numbers this follows:
  * assigned: 0 negative, -1 ignored, k > 0 the ground truth k - 1. Thresholds are compared with
    the float32 IoU in float32 (torch and jnp both round a Python float to the tensor's dtype).
  * ties: a candidate's best gt is the lowest index with the maximum IoU (torch's max); a low-
    quality match goes to every candidate equal to the gt's maximum, later gts overwriting.
  * avg_factor per image: max(#sampled positives, 1) + max(#sampled negatives, 1) (mmdet's
    SamplingResult); over a batch, their sum; a loss is sum / (avg_factor + float32 eps).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adaptor_jax.models import boxes

EPS = float(np.finfo(np.float32).eps)  # mmdet's weight_reduce_loss: sum / (avg_factor + eps)

# mask-rcnn_r50_fpn's train_cfg.
RPN_ASSIGN = dict(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True)
RPN_SAMPLE = dict(num=256, pos_fraction=0.5)
RCNN_ASSIGN = dict(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=True)
RCNN_SAMPLE = dict(num=512, pos_fraction=0.25)


def _check_vector(name, x, n, kind=None):
  if jnp.shape(x) != (n,):
    raise ValueError(f"{name}: want shape ({n},), got {jnp.shape(x)}")
  if kind is not None and jnp.result_type(x) != kind:
    raise ValueError(f"{name}: want dtype {jnp.dtype(kind).name}, got {jnp.result_type(x)}")


def max_iou_assign(iou_NG, gt_valid_G, *, pos_iou_thr, neg_iou_thr, min_pos_iou,
                   match_low_quality=True, valid_N=None):
  """(N,) int32 assignment of N candidates to G (padded) ground truths from their IoU (N, G):
  0 negative (max IoU < neg_iou_thr), -1 ignored, k > 0 ground truth k - 1 (max IoU >=
  pos_iou_thr, its argmax; then with match_low_quality every candidate whose IoU with gt i
  equals gt i's maximum >= min_pos_iou goes to i, i increasing). No valid gt: every valid
  candidate negative. valid_N (bool, optional): candidates that take part; the others get -1
  and count in no maximum (mmdet assigns only the anchors inside the valid flags)."""
  if jnp.ndim(iou_NG) != 2:
    raise ValueError(f"iou_NG: want shape (N, G), got {jnp.shape(iou_NG)}")
  n, g = iou_NG.shape
  _check_vector("gt_valid_G", gt_valid_G, g, bool)
  valid_N = jnp.ones((n,), bool) if valid_N is None else valid_N
  _check_vector("valid_N", valid_N, n, bool)
  if not isinstance(neg_iou_thr, (int, float)):
    raise ValueError(f"neg_iou_thr: want a float (mmdet's (lo, hi) form is not supported), "
                     f"got {neg_iou_thr}")
  iou_NG = jnp.asarray(iou_NG, jnp.float32)
  live_NG = valid_N[:, None] & gt_valid_G[None, :]
  iou_NG = jnp.where(live_NG, iou_NG, -1.0)  # below every real IoU: never a maximum
  if g == 0:
    return jnp.where(valid_N, 0, -1).astype(jnp.int32)
  max_N = jnp.max(iou_NG, axis=1)
  argmax_N = jnp.argmax(iou_NG, axis=1).astype(jnp.int32)  # first maximum, as torch's max
  assigned_N = jnp.full((n,), -1, jnp.int32)
  assigned_N = jnp.where((max_N >= 0) & (max_N < neg_iou_thr), 0, assigned_N)
  assigned_N = jnp.where(max_N >= pos_iou_thr, argmax_N + 1, assigned_N)
  if match_low_quality:
    gt_max_G = jnp.max(iou_NG, axis=0)
    eligible_G = gt_valid_G & (gt_max_G >= min_pos_iou)
    hit_NG = (iou_NG == gt_max_G[None, :]) & eligible_G[None, :] & valid_N[:, None]
    last_N = jnp.max(jnp.where(hit_NG, jnp.arange(1, g + 1, dtype=jnp.int32), 0), axis=1)
    assigned_N = jnp.where(last_N > 0, last_N, assigned_N)
  no_gt = ~jnp.any(gt_valid_G)
  return jnp.where(no_gt, jnp.where(valid_N, 0, -1), assigned_N).astype(jnp.int32)


def _choose(priority_N, eligible_N, k_max, count):
  """The `count` (traced, <= k_max and <= #eligible) eligible candidates of highest priority."""
  n = priority_N.shape[0]
  k = min(k_max, n)
  if k == 0:
    return jnp.zeros((n,), bool)
  _, top_K = lax.top_k(jnp.where(eligible_N, priority_N, -1), k)
  return jnp.zeros((n,), bool).at[top_K].set(jnp.arange(k) < count)


def sample(key, assigned_N, valid_N, *, num, pos_fraction):
  """mmdet's RandomSampler (neg_pos_ub=-1) with static shapes: (pos_N, neg_N) bool masks of
  min(#positives, int(num * pos_fraction)) positives (assigned > 0) and min(#negatives, num -
  that) negatives (assigned == 0), each set a uniformly random subset of its valid_N candidates
  (random 31-bit priorities, the highest taken: top-k of size num)."""
  n = jnp.shape(assigned_N)[0] if jnp.ndim(assigned_N) == 1 else None
  if n is None:
    raise ValueError(f"assigned_N: want shape (N,), got {jnp.shape(assigned_N)}")
  _check_vector("valid_N", valid_N, n, bool)
  if not isinstance(num, (int, np.integer)) or num < 0:
    raise ValueError(f"num: want a static int >= 0, got {num}")
  if not 0 <= pos_fraction <= 1:
    raise ValueError(f"pos_fraction: want a value in [0, 1], got {pos_fraction}")
  max_pos = int(num * pos_fraction)
  assigned_N = jnp.asarray(assigned_N)
  positive_N = (assigned_N > 0) & valid_N
  negative_N = (assigned_N == 0) & valid_N
  priority_N = (jax.random.bits(key, (n,), jnp.uint32) >> 1).astype(jnp.int32)
  num_pos = jnp.minimum(jnp.sum(positive_N, dtype=jnp.int32), max_pos)
  num_neg = jnp.minimum(jnp.sum(negative_N, dtype=jnp.int32), num - num_pos)
  # One priority vector serves both: the orders it induces on disjoint sets are independent.
  return (_choose(priority_N, positive_N, max_pos, num_pos),
          _choose(priority_N, negative_N, num, num_neg))


def add_gt_as_proposals(proposals_P4, proposal_valid_P, assigned_P, gt_boxes_G4, gt_valid_G):
  """The RoI sampler's add_gt_as_proposals: (boxes (G + P, 4), valid, assigned) with the ground
  truth first, gt i assigned i + 1 (mmdet's AssignResult.add_gt_, not the assigner). assigned_P
  comes from max_iou_assign over the proposals alone, as mmdet assigns before adding them, so
  the low-quality matches see only the proposals."""
  g = jnp.shape(gt_valid_G)[0]
  return (jnp.concatenate([gt_boxes_G4.astype(proposals_P4.dtype), proposals_P4]),
          jnp.concatenate([gt_valid_G, proposal_valid_P]),
          jnp.concatenate([jnp.where(gt_valid_G, jnp.arange(1, g + 1, dtype=jnp.int32), -1),
                           assigned_P.astype(jnp.int32)]))


def rpn_targets(key, anchors_N4, valid_N, gt_boxes_G4, gt_valid_G):
  """One image's RPN targets: (assigned_N, pos_N, neg_N), assignment at 0.7 / 0.3 / 0.3 with
  low-quality matches over the valid anchors (mmdet's valid flags; allowed_border -1), then 256
  sampled at 0.5 positive."""
  iou_NG = boxes.iou(jnp.asarray(anchors_N4), jnp.asarray(gt_boxes_G4))
  assigned_N = max_iou_assign(iou_NG, gt_valid_G, valid_N=valid_N, **RPN_ASSIGN)
  pos_N, neg_N = sample(key, assigned_N, valid_N, **RPN_SAMPLE)
  return assigned_N, pos_N, neg_N


def rpn_loss_sums(anchors_N4, logits_N, deltas_N4, gt_boxes_G4, assigned_N, pos_N, neg_N):
  """One image's unnormalised RPN losses from sampled masks: (sum of the sigmoid cross-entropy
  over the sampled anchors, target 1 for positives and 0 for negatives; sum over the positives
  and the 4 coordinates of |delta - encode(anchor, its gt)|; avg_factor = max(#pos, 1) +
  max(#neg, 1)), float32."""
  anchors_N4, gt_boxes_G4 = jnp.asarray(anchors_N4, jnp.float32), jnp.asarray(gt_boxes_G4)
  n = anchors_N4.shape[0]
  _check_vector("logits_N", logits_N, n)
  if jnp.shape(deltas_N4) != (n, 4):
    raise ValueError(f"deltas_N4: want shape ({n}, 4), got {jnp.shape(deltas_N4)}")
  x_N = logits_N.astype(jnp.float32)
  z_N = pos_N.astype(jnp.float32)
  bce_N = (1 - z_N) * x_N - jax.nn.log_sigmoid(x_N)  # torch's binary_cross_entropy_with_logits
  loss_cls = jnp.sum(jnp.where(pos_N | neg_N, bce_N, 0))
  # Non-positives regress to their own anchor (zero target): no inf or NaN from padded gts
  # reaches the gradient through the masked-out branch.
  gt_N4 = gt_boxes_G4.astype(jnp.float32)[jnp.maximum(assigned_N - 1, 0)]
  target_N4 = lax.stop_gradient(boxes.encode(anchors_N4, jnp.where(pos_N[:, None], gt_N4,
                                                                   anchors_N4)))
  l1_N4 = jnp.abs(deltas_N4.astype(jnp.float32) - target_N4)
  loss_bbox = jnp.sum(jnp.where(pos_N[:, None], l1_N4, 0))
  avg_factor = (jnp.maximum(jnp.sum(pos_N, dtype=jnp.int32), 1)
                + jnp.maximum(jnp.sum(neg_N, dtype=jnp.int32), 1)).astype(jnp.float32)
  return loss_cls, loss_bbox, avg_factor


def rpn_targets_and_loss(key, anchors_N4, valid_N, logits_N, deltas_N4, gt_boxes_G4, gt_valid_G):
  """One image's RPN (loss_cls, loss_bbox), mmdet's RPNHead with mask-rcnn_r50_fpn's settings
  for a batch of one image: each loss sum / (avg_factor + eps), weight 1. anchors_N4: every
  level's anchors concatenated, the rows of logits_N and deltas_N4; valid_N: mmdet's valid
  flags. For a batch use rpn_loss_batch: mmdet divides the batch's sums by the batch's
  avg_factor, not the mean of per-image losses."""
  assigned_N, pos_N, neg_N = rpn_targets(key, anchors_N4, valid_N, gt_boxes_G4, gt_valid_G)
  loss_cls, loss_bbox, avg_factor = rpn_loss_sums(anchors_N4, logits_N, deltas_N4, gt_boxes_G4,
                                                  assigned_N, pos_N, neg_N)
  return loss_cls / (avg_factor + EPS), loss_bbox / (avg_factor + EPS)


def rpn_loss_batch(key, anchors_N4, valid_BN, logits_BN, deltas_BN4, gt_boxes_BG4, gt_valid_BG):
  """The RPN's (loss_cls, loss_bbox) over a batch of B images as mmdet computes them on one GPU:
  per-image targets (image b samples with fold_in(key, b)), the sums over all images divided by
  the summed avg_factor (+ eps). anchors_N4 is shared; the rest has a leading B. mmdet does not
  reduce avg_factor across GPUs for the RPN: to match a run on several GPUs, call this per
  device batch (e.g. 2 images) and average the results."""
  b = jnp.shape(valid_BN)[0]
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))

  def one(k, valid_N, logits_N, deltas_N4, gt_boxes_G4, gt_valid_G):
    assigned_N, pos_N, neg_N = rpn_targets(k, anchors_N4, valid_N, gt_boxes_G4, gt_valid_G)
    return rpn_loss_sums(anchors_N4, logits_N, deltas_N4, gt_boxes_G4, assigned_N, pos_N, neg_N)

  cls_B, bbox_B, avg_B = jax.vmap(one)(keys, valid_BN, logits_BN, deltas_BN4, gt_boxes_BG4,
                                       gt_valid_BG)
  avg_factor = jnp.sum(avg_B)
  return jnp.sum(cls_B) / (avg_factor + EPS), jnp.sum(bbox_B) / (avg_factor + EPS)
