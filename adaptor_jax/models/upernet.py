"""UperNet (Xiao et al. 2018) on a VMamba-family backbone, as mmsegmentation builds it for
VMamba's ADE20K recipe (VMamba's segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-
512x512_tiny.py and the Swin / UperNet bases it inherits), channels last:

  backbone    a VSSM without its classifier; each stage's output through a LayerNorm of its own
              (VMamba's Backbone_VSSM: outnorm0..3)
  decode      UPerHead: a pyramid pooling module on stage 3 (adaptive average pools of 1, 2, 3
              and 6 bins, each a 1x1 ConvModule, upsampled back) and a 3x3 bottleneck; 1x1
              laterals on stages 0-2; the top-down path; 3x3 FPN convs; every level upsampled to
              stage 0 and fused by a 3x3 ConvModule; dropout 0.1; a 1x1 classifier with bias
  auxiliary   FCNHead on stage 2: one 3x3 ConvModule of 256 channels, dropout 0.1, a 1x1
              classifier; for the training loss only (weight 0.4)

ConvModule is mmcv's with a norm and an activation: a convolution without bias, BatchNorm
(common.BatchNorm: the global batch's statistics in training, SyncBN), ReLU. Every resize is
bilinear with align_corners=False (common.resize_bilinear).

In training (train()) the model returns (logits, aux logits), at 1/4 and 1/16 of the input; in
eval (eval()) the logits at 1/4. The task (training/segmentation.py) resizes them to the
labels, as mmseg does before its loss and its metrics.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from adaptor_jax.models import common
from adaptor_jax.models.vmamba import VSSM

POOL_SCALES = (1, 2, 3, 6)
# Starting from an ImageNet classifier of the backbone (training/init_from.py): its params go
# under "backbone", its classifier (head_norm, head) has no place here, and these parts start
# at their init.
FROM_CLASSIFIER = ("backbone", ("head_norm", "head"), ("outnorms", "decode_head", "auxiliary_head"))
KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # mmcv's ConvModule


class ConvModule(nnx.Module):
  """conv (no bias) -> BatchNorm -> ReLU."""

  def __init__(self, din, dout, kernel, *, dtype, rngs):
    self.conv = common.conv(din, dout, kernel, use_bias=False, dtype=dtype, rngs=rngs,
                            init=KAIMING_FAN_OUT)
    self.bn = common.BatchNorm(dout)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _classifier(din, num_classes, *, dtype, rngs):
  """The 1x1 conv_seg of mmseg's heads: normal(0, 0.01) weights, zero bias."""
  return nnx.Conv(din, num_classes, (1, 1), dtype=dtype, rngs=rngs,
                  kernel_init=nnx.initializers.normal(0.01), bias_init=nnx.initializers.zeros)


class UPerHead(nnx.Module):
  """mmseg's UPerHead: PPM on the last input, FPN over all, fused at the first's size."""

  def __init__(self, in_channels, channels, num_classes, *, dropout, dtype, rngs):
    last = in_channels[-1]
    self.psp_modules = nnx.List([ConvModule(last, channels, 1, dtype=dtype, rngs=rngs)
                                 for _ in POOL_SCALES])
    self.bottleneck = ConvModule(last + len(POOL_SCALES) * channels, channels, 3, dtype=dtype,
                                 rngs=rngs)
    self.lateral_convs = nnx.List([ConvModule(c, channels, 1, dtype=dtype, rngs=rngs)
                                   for c in in_channels[:-1]])
    self.fpn_convs = nnx.List([ConvModule(channels, channels, 3, dtype=dtype, rngs=rngs)
                               for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, dtype=dtype,
                                     rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.conv_seg = _classifier(channels, num_classes, dtype=dtype, rngs=rngs)

  def _psp(self, x):
    size = x.shape[1:3]
    pooled = [common.resize_bilinear(m(common.adaptive_avg_pool(x, bins)), size)
              for m, bins in zip(self.psp_modules, POOL_SCALES)]
    return self.bottleneck(jnp.concatenate([x, *pooled], axis=-1))

  def __call__(self, features):
    laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
    laterals.append(self._psp(features[-1]))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + common.resize_bilinear(
          laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:-1])]
    outs.append(laterals[-1])
    size = outs[0].shape[1:3]
    fused = self.fpn_bottleneck(jnp.concatenate(
        [outs[0]] + [common.resize_bilinear(o, size) for o in outs[1:]], axis=-1))
    return self.conv_seg(self.dropout(fused))


class FCNHead(nnx.Module):
  """mmseg's FCNHead with num_convs=1, concat_input=False."""

  def __init__(self, din, channels, num_classes, *, dropout, dtype, rngs):
    self.convs = nnx.List([ConvModule(din, channels, 3, dtype=dtype, rngs=rngs)])
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.conv_seg = _classifier(channels, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = conv(x)
    return self.conv_seg(self.dropout(x))


class UperNet(nnx.Module):
  """A VSSM backbone (no classifier) with stage-output LayerNorms, UPerHead and an FCNHead.

  backbone: the VSSM's constructor arguments (a preset of registry.VMAMBA_PRESETS). Takes images
  (B, H, W, 3); returns logits (B, H/4, W/4, num_classes), and in training also the auxiliary
  head's (B, H/16, W/16, num_classes).
  """

  def __init__(self, *, backbone, num_classes=150, channels=512, aux_channels=256, aux_stage=2,
               dropout=0.1, dtype=jnp.float32, rngs: nnx.Rngs):
    self.backbone = VSSM(**backbone, num_classes=0, dtype=dtype, rngs=rngs)
    dims = self.backbone.dims
    self.outnorms = nnx.List([common.LayerNorm(d) for d in dims])
    self.decode_head = UPerHead(dims, channels, num_classes, dropout=dropout, dtype=dtype,
                                rngs=rngs)
    self.auxiliary_head = FCNHead(dims[aux_stage], aux_channels, num_classes, dropout=dropout,
                                  dtype=dtype, rngs=rngs)
    self.aux_stage = aux_stage
    self.deterministic = False  # nnx's train() / eval() set it

  def __call__(self, x_BHW3):
    features = [norm(f) for norm, f in
                zip(self.outnorms, self.backbone(x_BHW3, return_features=True))]
    logits = self.decode_head(features)
    if self.deterministic:
      return logits
    return logits, self.auxiliary_head(features[self.aux_stage])
