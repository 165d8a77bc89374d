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
Training losses build on targets.py and roi_heads.py (not assembled yet).
"""
import jax
import jax.numpy as jnp
from flax import nnx

from adaptor_jax.models import boxes, common, fpn, roi_align, roi_heads, rpn
from adaptor_jax.models.vmamba import VSSM

# Starting from an ImageNet classifier of the backbone (training/init_from.py), as UperNet does.
FROM_CLASSIFIER = ("backbone", ("head_norm", "head"),
                   ("outnorms", "neck", "rpn_head", "bbox_head", "mask_head"))
STRIDES = (4, 8, 16, 32, 64)  # P2..P6: the anchors' strides; RoIs use the first four
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

  def __call__(self, x_BHW3, image_hw_B2=None, test=TEST):
    if image_hw_B2 is None:  # every image fills the canvas
      image_hw_B2 = jnp.broadcast_to(jnp.asarray(x_BHW3.shape[1:3], jnp.float32),
                                     (x_BHW3.shape[0], 2))
    levels = self.features(x_BHW3)
    anchors = boxes.anchors([f.shape[1:3] for f in levels], strides=STRIDES)
    heads = self.rpn_head(levels)

    def propose(heads_b, hw):
      return rpn.proposals(heads_b, anchors, hw, nms_pre=test["nms_pre"],
                           max_per_img=test["max_proposals"], iou_threshold=test["rpn_iou"])
    props_BP4, _, props_valid_BP = jax.vmap(propose)(heads, image_hw_B2)
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
