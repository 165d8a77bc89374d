"""Mask R-CNN (He et al. 2017) on a VMamba-family backbone, as mmdetection builds it for VMamba's
COCO recipe (VMamba's detection/configs/vssm1/mask_rcnn_vssm_fpn_coco_tiny.py and the mmdet
mask-rcnn_r50_fpn base it inherits), channels last and with static shapes:

  backbone    a VSSM without its classifier, each stage's output through a LayerNorm of its own
              (VMamba's Backbone_VSSM, as models/upernet.py)
  neck        FPN of 256 channels, P2..P6 (fpn.py)
  rpn_head    objectness and deltas of 3 anchors per location (rpn.py), then proposals
  bbox_head   RoIAlign 7x7 of each proposal on its level (roi_align.py), two shared fc layers,
              class logits and class-specific deltas (roi_heads.py)
  mask_head   RoIAlign 14x14 of each detection, four 3x3 convs, a 2x upsampling, class masks

Inference (`__call__`, the test_cfg of mask-rcnn_r50_fpn): 1,000 proposals per image (top 1,000
per level, NMS 0.7), their class scores and boxes, mmdet's multiclass NMS (score 0.05, IoU 0.5,
100 detections; static: the 1,000 best (box, class) pairs enter NMS), each detection's 28x28 mask
probabilities of its class. Boxes are in the input image's pixels, clipped to its unpadded size
`image_hw`; pasting masks into the image and rescaling to the original image are the evaluator's.

Training (`losses`, the train_cfg): the RPN's loss over the anchors inside each image's padded
shape (mmdet's valid flags), 2,000 candidates per level into 1,000 proposals (not
differentiated, as mmdet detaches them), the ground truth added to them, 512 sampled (25%
positive) into 512 static slots, positives first; the box head's losses on them and the mask
head's on the first 128 slots (every sampled positive fits: 512 x 0.25). Ground truth per image
is padded to a fixed G: boxes, labels (0-based), valid, and masks as M x M crops inside their
boxes (roi_heads.mask_targets).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from adaptor_jax.models import boxes, common, fpn, roi_align, roi_heads, rpn, targets
from adaptor_jax.models.vmamba import VSSM

# Starting from an ImageNet classifier of the backbone (training/init_from.py), as UperNet does.
FROM_CLASSIFIER = ("backbone", ("head_norm", "head"),
                   ("outnorms", "neck", "rpn_head", "bbox_head", "mask_head"))
STRIDES = (4, 8, 16, 32, 64)  # P2..P6: the anchors' strides; RoIs use the first four
TRAIN = dict(nms_pre=2000, max_proposals=1000, rpn_iou=0.7)  # mask-rcnn_r50_fpn's train_cfg
TEST = dict(nms_pre=1000, max_proposals=1000, rpn_iou=0.7, score_thr=0.05, iou=0.5,
            max_per_img=100, max_candidates=1000)


class MaskRCNN(nnx.Module):
  """backbone: the VSSM's constructor arguments (a preset of registry.VMAMBA_PRESETS). Takes
  images (B, H, W, 3) with H and W multiples of 32 and each image's unpadded (height, width)
  (B, 2) (None: the whole canvas); returns per image (boxes (100, 4), scores (100,), labels (100,) int32 (-1: empty),
  valid (100,), masks (100, 28, 28) probabilities)."""

  def __init__(self, *, backbone, num_classes=80, channels=256, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.backbone = VSSM(**backbone, num_classes=0, dtype=dtype, rngs=rngs)
    dims = self.backbone.dims
    self.outnorms = nnx.List([common.LayerNorm(d) for d in dims])
    self.neck = fpn.FPN(dims, channels, len(STRIDES), dtype=dtype, rngs=rngs)
    self.rpn_head = rpn.RPNHead(channels, 3, dtype=dtype, rngs=rngs)
    self.bbox_head = roi_heads.BBoxHead(channels, 7, 1024, num_classes, dtype=dtype, rngs=rngs)
    self.mask_head = roi_heads.MaskHead(channels, channels, 4, num_classes, dtype=dtype,
                                        rngs=rngs)
    self.num_classes = num_classes

  def features(self, x_BHW3):
    """The FPN's levels P2..P6, (B, H / s, W / s, 256) for s in STRIDES."""
    stages = self.backbone(x_BHW3, return_features=True)
    return self.neck([norm(f) for norm, f in zip(self.outnorms, stages)])

  def _proposals(self, levels, heads, image_hw_B2, cfg):
    anchors = boxes.anchors([f.shape[1:3] for f in levels], strides=STRIDES)

    def propose(heads_b, hw):
      return rpn.proposals(heads_b, anchors, hw, nms_pre=cfg["nms_pre"],
                           max_per_img=cfg["max_proposals"], iou_threshold=cfg["rpn_iou"])
    return jax.vmap(propose)(heads, image_hw_B2)

  def losses(self, x_BHW3, image_hw_B2, gt_boxes_BG4, gt_labels_BG, gt_valid_BG, gt_masks_BGMM,
             key, train=TRAIN):
    """mmdet's five training losses of one batch (one GPU's, as mmdet normalises them), a dict:
    loss_rpn_cls, loss_rpn_bbox, loss_cls, loss_bbox, loss_mask."""
    levels = self.features(x_BHW3)
    heads = self.rpn_head(levels)
    sizes = [f.shape[1:3] for f in levels]
    pad_hw_B2 = jnp.ceil(image_hw_B2 / 32.0) * 32.0  # mmdet's pad_shape (size_divisor 32)
    valid_BN = jnp.concatenate([_valid_flags(size, stride, pad_hw_B2)
                                for size, stride in zip(sizes, STRIDES)], axis=1)
    k_rpn, k_roi = jax.random.split(key)
    loss_rpn_cls, loss_rpn_bbox = targets.rpn_loss_batch(
        k_rpn, jnp.concatenate(boxes.anchors(sizes, strides=STRIDES)), valid_BN,
        jnp.concatenate([logits for logits, _ in heads], axis=1),
        jnp.concatenate([deltas for _, deltas in heads], axis=1), gt_boxes_BG4, gt_valid_BG)
    props_BP4, _, props_valid_BP = self._proposals(levels, jax.lax.stop_gradient(heads),
                                                   image_hw_B2, train)
    batch = x_BHW3.shape[0]
    keys = jax.random.split(k_roi, batch)
    rois_BR4, assigned_BR, pos_BR, neg_BR = jax.vmap(_sample_rois)(
        keys, props_BP4, props_valid_BP, gt_boxes_BG4, gt_valid_BG)
    R = rois_BR4.shape[1]
    feats = roi_align.batch_multilevel_roi_align(levels[:4], rois_BR4, 7, strides=STRIDES[:4])
    logits, deltas = self.bbox_head(feats.reshape(batch * R, *feats.shape[2:]))
    labels_BR, label_w, box_t, box_w = jax.vmap(
        lambda *a: roi_heads.bbox_targets(*a, num_classes=self.num_classes))(
            rois_BR4, pos_BR | neg_BR, assigned_BR, pos_BR, neg_BR, gt_boxes_BG4, gt_labels_BG)
    loss_cls, loss_bbox = roi_heads.bbox_loss(
        logits.reshape(batch, R, -1), deltas.reshape(batch, R, -1), labels_BR, label_w, box_t,
        box_w)
    sample = targets.RCNN_SAMPLE
    M = min(int(sample["num"] * sample["pos_fraction"]), R)  # the slots that hold positives
    mask_rois = rois_BR4[:, :M]
    feats = roi_align.batch_multilevel_roi_align(levels[:4], mask_rois, 14, strides=STRIDES[:4])
    mask_logits = self.mask_head(feats.reshape(batch * M, *feats.shape[2:]))
    mask_t = jax.vmap(roi_heads.mask_targets)(mask_rois, pos_BR[:, :M], assigned_BR[:, :M],
                                              gt_boxes_BG4, gt_masks_BGMM)
    loss_mask = roi_heads.mask_loss(mask_logits.reshape(batch, M, *mask_logits.shape[1:]),
                                    labels_BR[:, :M], pos_BR[:, :M], mask_t)
    return dict(loss_rpn_cls=loss_rpn_cls, loss_rpn_bbox=loss_rpn_bbox, loss_cls=loss_cls,
                loss_bbox=loss_bbox, loss_mask=loss_mask)

  def __call__(self, x_BHW3, image_hw_B2=None, test=TEST):
    if image_hw_B2 is None:  # every image fills the canvas
      image_hw_B2 = jnp.broadcast_to(jnp.asarray(x_BHW3.shape[1:3], jnp.float32),
                                     (x_BHW3.shape[0], 2))
    levels = self.features(x_BHW3)
    props_BP4, _, props_valid_BP = self._proposals(levels, self.rpn_head(levels), image_hw_B2,
                                                   test)
    rois = levels[:4]
    feats = roi_align.batch_multilevel_roi_align(rois, props_BP4, 7, strides=STRIDES[:4])
    batch, P = props_BP4.shape[:2]
    logits, deltas = self.bbox_head(feats.reshape(batch * P, *feats.shape[2:]))
    scores_BPC = jax.nn.softmax(logits, axis=-1).reshape(batch, P, -1)
    deltas_BPK = deltas.reshape(batch, P, -1)

    def detect(props_P4, deltas_PK, scores_PC, valid_P, hw):
      boxes_PK = boxes.decode(props_P4, deltas_PK, stds=roi_heads.BBOX_STDS, max_shape=hw)
      return boxes.multiclass_nms(boxes_PK, scores_PC, score_thr=test["score_thr"],
                                  iou_threshold=test["iou"], max_per_img=test["max_per_img"],
                                  max_candidates=test["max_candidates"], valid_P=valid_P)
    det_BD4, det_scores, det_labels, det_valid = jax.vmap(detect)(
        props_BP4, deltas_BPK, scores_BPC, props_valid_BP, image_hw_B2)
    feats = roi_align.batch_multilevel_roi_align(rois, det_BD4, 14, strides=STRIDES[:4])
    D = det_BD4.shape[1]
    mask_logits = self.mask_head(feats.reshape(batch * D, *feats.shape[2:]))
    mask_logits = mask_logits.reshape(batch, D, *mask_logits.shape[1:])  # (B, D, 28, 28, C)
    own = jnp.take_along_axis(mask_logits, jnp.maximum(det_labels, 0)[:, :, None, None, None],
                              axis=-1)[..., 0]
    return det_BD4, det_scores, det_labels, det_valid, jax.nn.sigmoid(own)


def _valid_flags(size, stride, pad_hw_B2, num_anchors=3):
  """mmdet's AnchorGenerator.valid_flags: (B, H W A) anchors on grid locations inside each
  image's padded shape (at most ceil(pad / stride) rows and columns)."""
  h, w = size
  rows_B = jnp.minimum(jnp.ceil(pad_hw_B2[:, 0] / stride), h)
  cols_B = jnp.minimum(jnp.ceil(pad_hw_B2[:, 1] / stride), w)
  ok_BHW = ((jnp.arange(h)[None, :, None] < rows_B[:, None, None])
            & (jnp.arange(w)[None, None, :] < cols_B[:, None, None]))
  return jnp.repeat(ok_BHW.reshape(-1, h * w), num_anchors, axis=1)


def _sample_rois(key, props_P4, valid_P, gt_boxes_G4, gt_valid_G):
  """One image's RoI sampling (mmdet's MaxIoUAssigner 0.5 over the proposals, the ground truth
  added, RandomSampler 512 at 0.25) into RCNN_SAMPLE["num"] slots (or as many as there are
  candidates), positives first, then
  negatives, then empty slots: (rois (R, 4), assigned (R,), pos (R,), neg (R,))."""
  iou_PG = boxes.iou(props_P4, gt_boxes_G4)
  assigned_P = targets.max_iou_assign(iou_PG, gt_valid_G, valid_N=valid_P, **targets.RCNN_ASSIGN)
  rois_N4, valid_N, assigned_N = targets.add_gt_as_proposals(props_P4, valid_P, assigned_P,
                                                             gt_boxes_G4, gt_valid_G)
  pos_N, neg_N = targets.sample(key, assigned_N, valid_N, **targets.RCNN_SAMPLE)
  rank_N = 2 * pos_N.astype(jnp.int32) + neg_N.astype(jnp.int32)
  _, slots = jax.lax.top_k(rank_N, min(targets.RCNN_SAMPLE["num"], rank_N.shape[0]))
  return (jax.lax.stop_gradient(rois_N4[slots]), assigned_N[slots], pos_N[slots], neg_N[slots])
