"""The box and mask heads of Mask R-CNN as mmdetection 3.x builds them (config mask-rcnn_r50_fpn:
Shared2FCBBoxHead, FCNMaskHead), their training targets and losses, channels last and with static
shapes (jit, vmap over a batch, TPU), as TF Model Garden's Mask R-CNN:

  BBoxHead      RoI features (K, 7, 7, C) flattened in torch's (C, 7, 7) order (so that official
                weights import as they are) -> fc 1024, ReLU -> fc 1024, ReLU -> fc_cls
                (num_classes + 1 logits, background last) and fc_reg (4 num_classes deltas,
                class-specific). Init: shared fcs Xavier uniform, fc_cls normal(0, 0.01), fc_reg
                normal(0, 0.001), biases 0 (ConvFCBBoxHead's and BBoxHead's init_cfg)
  MaskHead      RoI features (K, 14, 14, C) -> 4 x (3x3 conv 256 with bias, ReLU) -> 2x2 stride 2
                transposed conv 256, ReLU -> 1x1 conv to num_classes mask logits (K, 28, 28,
                num_classes). Init: convs Kaiming normal fan_out (mmcv's ConvModule), the
                transposed conv and conv_logits Kaiming normal fan_out relu
                (FCNMaskHead.init_weights), biases 0
  bbox_targets  BBoxHead._get_target_single on a padded, masked set of proposals
  bbox_loss     BBoxHead.loss: softmax cross-entropy / (max(#sampled, 1) + eps), L1 on the
                positives' own-class deltas / (#sampled + eps), over the whole batch
  mask_targets  mask_target_single, from ground-truth masks stored as crops of their boxes
  mask_loss     FCNMaskHead.loss_and_target: mask_cross_entropy, the mean BCE over the
                positives' own-class mask pixels of the whole batch

The transposed conv: torch's ConvTranspose2d(256, 256, 2, stride=2) sets output[2i + a, 2j + b, o]
= sum_c x[i, j, c] W[c, o, a, b] + bias[o]. nnx.ConvTranspose with transpose_kernel=True holds a
kernel (2, 2, out, in) and computes the same with kernel[a, b, o, c] = W[c, o, a, b] (import:
W.transpose(2, 3, 1, 0)); its Kaiming fan_out (in * 4) is then torch's for W.

Batches. Every loss here takes any leading shape (one image's (P, ...) or a batch's (B, P, ...)),
which it flattens: the concatenation over images that mmdet's get_targets(concat=True) makes.
mmdet divides each loss once per batch (one GPU's images); the *_sums functions give the
numerators and counts so that a caller can add them over images or devices and divide once.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from adaptor_jax.models import boxes

EPS = float(np.finfo(np.float32).eps)  # mmdet's weight_reduce_loss: sum / (avg_factor + eps)
BBOX_STDS = (0.1, 0.1, 0.2, 0.2)  # the box head's DeltaXYWHBBoxCoder target_stds (means 0)
XAVIER = nnx.initializers.xavier_uniform()
KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
ZEROS = nnx.initializers.zeros


class BBoxHead(nnx.Module):
  """mmdet's Shared2FCBBoxHead: (K, roi, roi, C) features -> (class logits (K, num_classes + 1),
  deltas (K, 4 num_classes)), float32. Deltas of class j are columns 4 j .. 4 j + 3, normalised
  by means 0 and stds BBOX_STDS; logit num_classes is the background."""

  def __init__(self, in_channels=256, roi_size=7, fc_channels=1024, num_classes=80, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    din = in_channels * roi_size * roi_size
    linear = lambda i, o, init: nnx.Linear(i, o, dtype=dtype, kernel_init=init, bias_init=ZEROS,
                                           rngs=rngs)
    self.shared_fcs = nnx.List([linear(din, fc_channels, XAVIER),
                                linear(fc_channels, fc_channels, XAVIER)])
    self.fc_cls = linear(fc_channels, num_classes + 1, nnx.initializers.normal(0.01))
    self.fc_reg = linear(fc_channels, 4 * num_classes, nnx.initializers.normal(0.001))
    self.in_channels, self.roi_size, self.num_classes = in_channels, roi_size, num_classes

  def __call__(self, x_KhwC):
    want = (self.roi_size, self.roi_size, self.in_channels)
    if x_KhwC.ndim != 4 or x_KhwC.shape[1:] != want:
      raise ValueError(f"x_KhwC: want shape (K, {', '.join(map(str, want))}), got {x_KhwC.shape}")
    # torch flattens (K, C, h, w): the fc weights of imported checkpoints expect that order.
    x_KD = jnp.transpose(x_KhwC, (0, 3, 1, 2)).reshape(x_KhwC.shape[0], -1)
    for fc in self.shared_fcs:
      x_KD = jax.nn.relu(fc(x_KD))
    return self.fc_cls(x_KD).astype(jnp.float32), self.fc_reg(x_KD).astype(jnp.float32)


class MaskHead(nnx.Module):
  """mmdet's FCNMaskHead (class-specific): (K, h, w, C) features -> mask logits (K, 2h, 2w,
  num_classes), float32."""

  def __init__(self, in_channels=256, channels=256, num_convs=4, num_classes=80, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.convs = nnx.List([
        nnx.Conv(in_channels if i == 0 else channels, channels, (3, 3),
                 padding=((1, 1), (1, 1)), dtype=dtype, kernel_init=KAIMING_FAN_OUT,
                 bias_init=ZEROS, rngs=rngs) for i in range(num_convs)])
    self.upsample = nnx.ConvTranspose(channels, channels, (2, 2), strides=(2, 2), padding="VALID",
                                      transpose_kernel=True, dtype=dtype,
                                      kernel_init=KAIMING_FAN_OUT, bias_init=ZEROS, rngs=rngs)
    self.conv_logits = nnx.Conv(channels, num_classes, (1, 1), dtype=dtype,
                                kernel_init=KAIMING_FAN_OUT, bias_init=ZEROS, rngs=rngs)
    self.in_channels, self.num_classes = in_channels, num_classes

  def __call__(self, x_KhwC):
    if x_KhwC.ndim != 4 or x_KhwC.shape[3] != self.in_channels:
      raise ValueError(f"x_KhwC: want shape (K, h, w, {self.in_channels}), got {x_KhwC.shape}")
    for conv in self.convs:
      x_KhwC = jax.nn.relu(conv(x_KhwC))
    x_KhwC = jax.nn.relu(self.upsample(x_KhwC))
    return self.conv_logits(x_KhwC).astype(jnp.float32)


def _gt_of(assigned_P, table_G):
  """Row assigned - 1 of table_G for each proposal (row 0 for the unassigned)."""
  return table_G[jnp.clip(assigned_P - 1, 0, table_G.shape[0] - 1)]


def bbox_targets(proposals_P4, proposal_valid_P, assigned_P, pos_P, neg_P, gt_boxes_G4,
                 gt_labels_G, *, num_classes=80):
  """One image's box-head targets, mmdet's BBoxHead._get_target_single (pos_weight -1, deltas
  not decoded) with static shapes: (labels_P int32: the gt's label on sampled positives,
  num_classes elsewhere; label_weights_P float32: 1 on sampled proposals; bbox_targets_P4:
  encode(proposal, its gt) with means 0, stds BBOX_STDS on sampled positives, 0 elsewhere;
  bbox_weights_P: 1 on sampled positives). assigned_P: max_iou_assign's (k > 0: gt k - 1);
  pos_P, neg_P: sample's masks; gt_labels_G: 0-based classes. Unsampled and invalid proposals
  get weight 0 and label num_classes, so they count nowhere in bbox_loss."""
  proposals_P4 = jnp.asarray(proposals_P4, jnp.float32)
  p = proposals_P4.shape[0]
  for name, x in (("proposal_valid_P", proposal_valid_P), ("assigned_P", assigned_P),
                  ("pos_P", pos_P), ("neg_P", neg_P)):
    if jnp.shape(x) != (p,):
      raise ValueError(f"{name}: want shape ({p},) as proposals_P4, got {jnp.shape(x)}")
  if jnp.shape(gt_labels_G) != jnp.shape(gt_boxes_G4)[:1]:
    raise ValueError(f"gt_labels_G: want shape {jnp.shape(gt_boxes_G4)[:1]}, "
                     f"got {jnp.shape(gt_labels_G)}")
  pos_P = pos_P & proposal_valid_P & (assigned_P > 0)
  neg_P = neg_P & proposal_valid_P & ~pos_P
  labels_P = jnp.where(pos_P, _gt_of(assigned_P, jnp.asarray(gt_labels_G, jnp.int32)),
                       num_classes).astype(jnp.int32)
  label_weights_P = (pos_P | neg_P).astype(jnp.float32)
  # The others encode their own box (0 deltas): no inf or NaN from padded boxes anywhere.
  safe_P4 = jnp.where(pos_P[:, None], proposals_P4, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
  gt_P4 = jnp.where(pos_P[:, None], _gt_of(assigned_P, jnp.asarray(gt_boxes_G4, jnp.float32)),
                    safe_P4)
  targets_P4 = boxes.encode(safe_P4, gt_P4, stds=BBOX_STDS)
  targets_P4 = jnp.where(pos_P[:, None], targets_P4, 0.0)
  return labels_P, label_weights_P, lax.stop_gradient(targets_P4), pos_P.astype(jnp.float32)


def bbox_loss_sums(cls_logits_PC1, deltas_P4C, labels_P, label_weights_P, bbox_targets_P4,
                   bbox_weights_P):
  """The numerators and counts of mmdet's BBoxHead.loss, float32: (sum over proposals of
  label_weight * softmax cross-entropy; sum over positives (label < num_classes) of bbox_weight
  * |deltas of the label's class - target| over the 4 coordinates; #(label_weights > 0);
  #sampled proposals, mmdet's bbox_targets.size(0), here also #(label_weights > 0)). Any
  leading shape (a batch) is flattened. Add them over images / devices, then bbox_loss_divide."""
  cls_logits_PC1 = jnp.asarray(cls_logits_PC1)
  c = cls_logits_PC1.shape[-1] - 1
  lead = cls_logits_PC1.shape[:-1]
  if jnp.shape(deltas_P4C) != (*lead, 4 * c):
    raise ValueError(f"deltas_P4C: want shape {(*lead, 4 * c)} for {c} classes, "
                     f"got {jnp.shape(deltas_P4C)}")
  for name, x, shape in (("labels_P", labels_P, lead), ("label_weights_P", label_weights_P, lead),
                         ("bbox_targets_P4", bbox_targets_P4, (*lead, 4)),
                         ("bbox_weights_P", bbox_weights_P, lead)):
    if jnp.shape(x) != shape:
      raise ValueError(f"{name}: want shape {shape}, got {jnp.shape(x)}")
  logits_PC1 = cls_logits_PC1.reshape(-1, c + 1).astype(jnp.float32)
  labels_P = jnp.asarray(labels_P, jnp.int32).reshape(-1)
  weights_P = jnp.asarray(label_weights_P, jnp.float32).reshape(-1)
  log_p_P = jnp.take_along_axis(jax.nn.log_softmax(logits_PC1), labels_P[:, None], 1)[:, 0]
  loss_cls = jnp.sum(jnp.where(weights_P > 0, -log_p_P * weights_P, 0.0))
  positive_P = (labels_P >= 0) & (labels_P < c)
  deltas_PC4 = jnp.asarray(deltas_P4C).reshape(-1, c, 4).astype(jnp.float32)
  own_P4 = jnp.take_along_axis(deltas_PC4, jnp.clip(labels_P, 0, c - 1)[:, None, None], 1)[:, 0]
  l1_P4 = jnp.abs(own_P4 - jnp.asarray(bbox_targets_P4, jnp.float32).reshape(-1, 4))
  l1_P4 = l1_P4 * jnp.asarray(bbox_weights_P, jnp.float32).reshape(-1, 1)
  loss_bbox = jnp.sum(jnp.where(positive_P[:, None], l1_P4, 0.0))
  num_sampled = jnp.sum(weights_P > 0).astype(jnp.float32)
  return loss_cls, loss_bbox, num_sampled, num_sampled


def bbox_loss_divide(loss_cls, loss_bbox, num_weighted, num_sampled):
  """(loss_cls, loss_bbox) from summed bbox_loss_sums: cls / (max(num_weighted, 1) + eps), bbox /
  (num_sampled + eps) (mmdet's L1 avg_factor is bbox_targets.size(0), not floored: with nothing
  sampled there are no positives and the sum is 0)."""
  return (loss_cls / (jnp.maximum(num_weighted, 1.0) + EPS), loss_bbox / (num_sampled + EPS))


def bbox_loss(cls_logits_PC1, deltas_P4C, labels_P, label_weights_P, bbox_targets_P4,
              bbox_weights_P):
  """mmdet's BBoxHead.loss (CrossEntropyLoss, L1Loss, weights 1) over one image (P, ...) or a
  batch (B, P, ...) as one GPU's batch: (loss_cls, loss_bbox)."""
  return bbox_loss_divide(*bbox_loss_sums(cls_logits_PC1, deltas_P4C, labels_P, label_weights_P,
                                          bbox_targets_P4, bbox_weights_P))


def _crop_taps(lo_P, hi_P, glo_P, ghi_P, size, m):
  """(P, size, m) weights that resample one axis: the `size` sample centres of [lo, hi] (pixel
  centres: lo + (p + 0.5) (hi - lo) / size), bilinear in the m cells of [glo, ghi] (cell j's
  centre glo + (j + 0.5) (ghi - glo) / m, clamped to the first / last cell at the edges), 0 for
  a sample outside [glo, ghi]."""
  p = jnp.arange(size, dtype=jnp.float32)
  u = lo_P[:, None] + (p[None, :] + 0.5) * ((hi_P - lo_P) / size)[:, None]
  width = jnp.maximum(ghi_P - glo_P, 1e-6)[:, None]
  c = jnp.clip((u - glo_P[:, None]) * (m / width) - 0.5, 0.0, m - 1.0)
  low = jnp.floor(c)
  frac = c - low
  j = jnp.arange(m, dtype=jnp.float32)
  w = (jnp.where(j == low[..., None], 1.0 - frac[..., None], 0.0)
       + jnp.where(j == low[..., None] + 1, frac[..., None], 0.0))
  inside = (u >= glo_P[:, None]) & (u <= ghi_P[:, None])
  return jnp.where(inside[..., None], w, 0.0)


def resample_crops(proposals_P4, crop_boxes_P4, crops_PMM, mask_size=28):
  """(P, mask_size, mask_size) float32: each crop (M x M values filling its box) sampled bilinearly
  at the proposal's mask_size x mask_size bin centres, 0 outside the crop's box."""
  proposals_P4 = jnp.asarray(proposals_P4, jnp.float32)
  crop_boxes_P4 = jnp.asarray(crop_boxes_P4, jnp.float32)
  m = crops_PMM.shape[-1]
  wy_PSM = _crop_taps(proposals_P4[:, 1], proposals_P4[:, 3], crop_boxes_P4[:, 1],
                      crop_boxes_P4[:, 3], mask_size, m)
  wx_PSM = _crop_taps(proposals_P4[:, 0], proposals_P4[:, 2], crop_boxes_P4[:, 0],
                      crop_boxes_P4[:, 2], mask_size, m)
  hi = lax.Precision.HIGHEST  # no bf16 passes on TPU
  rows_PSM = jnp.einsum("psm,pmn->psn", wy_PSM, crops_PMM.astype(jnp.float32), precision=hi)
  return jnp.einsum("psn,ptn->pst", rows_PSM, wx_PSM, precision=hi)


def mask_targets(proposals_P4, pos_P, assigned_P, gt_boxes_G4, gt_masks_GMM, mask_size=28):
  """One image's mask targets (P, mask_size, mask_size) float32 0 / 1, zero for non-positives.

  Ground-truth masks come as TF Model Garden keeps them: gt_masks_GMM[g] an M x M (e.g. 28 or
  56) 0 / 1 crop of gt g's mask over its box gt_boxes_G4[g], not a full-image bitmap. A positive
  proposal's target is its gt's crop resampled (resample_crops: bilinear at the proposal's bin
  centres, 0 outside the gt box), binarized at >= 0.5.

  Departure from mmdet: mask_target_single clips the proposals to the (padded) image, then
  BitmapMasks.crop_and_resize takes roi_align(full bitmap, proposal, mask_size, scale 1,
  sampling_ratio 0 (adaptive: ceil(roi size / mask_size)^2 samples per bin), aligned=True) and
  binarizes at >= 0.5. Here one sample per bin reads a crop already resampled to M x M and
  binarized, so boundaries move by up to about half a crop cell. Proposals come clipped to the
  image already (the RPN's and gt boxes), so the clipping is no difference. On a disc of radius
  40 px (tests/test_roi_heads.py::test_mask_target_departure_from_full_bitmap), over proposals
  of IoU >= 0.5 with its box, our 28 x 28 target's IoU with mmdet's (full bitmap) is mean
  0.981 / min 0.962 for M = 28 and mean 0.990 / min 0.974 for M = 56.
  """
  proposals_P4 = jnp.asarray(proposals_P4, jnp.float32)
  p = proposals_P4.shape[0]
  for name, x in (("pos_P", pos_P), ("assigned_P", assigned_P)):
    if jnp.shape(x) != (p,):
      raise ValueError(f"{name}: want shape ({p},) as proposals_P4, got {jnp.shape(x)}")
  g = jnp.shape(gt_boxes_G4)[0]
  if jnp.ndim(gt_masks_GMM) != 3 or jnp.shape(gt_masks_GMM)[0] != g:
    raise ValueError(f"gt_masks_GMM: want shape ({g}, M, M), got {jnp.shape(gt_masks_GMM)}")
  pos_P = pos_P & (assigned_P > 0)
  crop_boxes_P4 = _gt_of(assigned_P, jnp.asarray(gt_boxes_G4, jnp.float32))
  crops_PMM = _gt_of(assigned_P, jnp.asarray(gt_masks_GMM, jnp.float32))
  soft_PSS = resample_crops(proposals_P4, crop_boxes_P4, crops_PMM, mask_size)
  target_PSS = (soft_PSS >= 0.5) & pos_P[:, None, None]
  return lax.stop_gradient(target_PSS.astype(jnp.float32))


def mask_loss_sums(mask_logits_PSSC, labels_P, pos_P, targets_PSS):
  """(sum over positives and pixels of BCE-with-logits on the label's own mask; #positives),
  float32. Any leading shape is flattened (a batch)."""
  logits = jnp.asarray(mask_logits_PSSC)
  lead, (s1, s2, c) = logits.shape[:-3], logits.shape[-3:]
  for name, x, shape in (("labels_P", labels_P, lead), ("pos_P", pos_P, lead),
                         ("targets_PSS", targets_PSS, (*lead, s1, s2))):
    if jnp.shape(x) != shape:
      raise ValueError(f"{name}: want shape {shape}, got {jnp.shape(x)}")
  logits = logits.reshape(-1, s1, s2, c)
  labels_P = jnp.clip(jnp.asarray(labels_P, jnp.int32).reshape(-1), 0, c - 1)
  pos_P = jnp.asarray(pos_P, bool).reshape(-1)
  x_PSS = jnp.take_along_axis(logits, labels_P[:, None, None, None], 3)[..., 0]
  x_PSS = x_PSS.astype(jnp.float32)
  z_PSS = jnp.asarray(targets_PSS, jnp.float32).reshape(-1, s1, s2)
  bce_PSS = (1 - z_PSS) * x_PSS - jax.nn.log_sigmoid(x_PSS)  # torch's, stable
  total = jnp.sum(jnp.where(pos_P[:, None, None], bce_PSS, 0.0))
  return total, jnp.sum(pos_P).astype(jnp.float32)


def mask_loss(mask_logits_PSSC, labels_P, pos_P, targets_PSS):
  """mmdet's FCNMaskHead loss (mask_cross_entropy, weight 1) over one image or a batch: the mean
  BCE over all positives' pixels, sum / (#positives * S * S), no eps (torch's reduction='mean');
  0 without positives (mmdet: mask_preds.sum() of an empty tensor)."""
  total, count = mask_loss_sums(mask_logits_PSSC, labels_P, pos_P, targets_PSS)
  s1, s2 = jnp.shape(mask_logits_PSSC)[-3:-1]
  return total / (jnp.maximum(count, 1.0) * (s1 * s2))
