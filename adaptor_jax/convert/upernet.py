"""Official VMamba UperNet checkpoints (MzeroMiko/VMamba's segmentation/, mmsegmentation 1.2.2:
EncoderDecoder with Backbone_VSSM, UPerHead and FCNHead) <-> our upernet_vmamba_* params.

Import:  python -m adaptor_jax.convert.upernet --checkpoint=FILE.pth --model=upernet_vmamba_tiny \
             --output=DIR
Export:  python -m adaptor_jax.convert.upernet --export --input=DIR --checkpoint=OUT.pth
FILE: VMamba's released ADE20K checkpoints, upernet_vssm_4xb4-160k_ade20k-512x512_{tiny_s_iter_
160000, small_iter_144000, base_iter_160000}.pth (configs segmentation/configs/vssm1/upernet_vssm_
4xb4-160k_ade20k-512x512_{tiny,small,base}.py) into upernet_vmamba_{tiny,small,base}. mmengine
saves the state dict under "state_dict" (--key's default here) beside "meta", "message_hub" and
maybe "optimizer", which are not read (their objects become inert stand-ins, state_dict.py); a
.npz of the state dict's keys needs no torch. The class count comes from decode_head.conv_seg.bias
(150 for ADE20K). DIR: an orbax checkpoint of the params and of BatchNorm's running statistics
(`stats`) plus `model.json`; `load_model(DIR)` and `restore(DIR)` rebuild the model, and
--export also takes a training workdir or step directory of an upernet_vmamba_* run; it writes
{"state_dict": ...} (no "meta": mmseg's load_checkpoint reads the weights, and a config gives the
class names) or an .npz.

Layout, key for key (mmcv's ConvModule with a norm: `conv` without bias, then `bn`):
  backbone.*                      VMamba's classification keys (convert/vmamba.py) without the
                                  classifier (Backbone_VSSM deletes it), and outnorm{0..3}: the
                                  LayerNorm of each stage's output
  decode_head.psp_modules.{i}.1   PPM: AdaptiveAvgPool2d (index 0, no params), ConvModule 1x1
  decode_head.bottleneck, .lateral_convs.{i}, .fpn_convs.{i}, .fpn_bottleneck   ConvModules
  decode_head.conv_seg            the 1x1 classifier, with bias
  auxiliary_head.convs.0, .conv_seg   FCNHead (num_convs 1, no conv_cat)
BatchNorm's running_mean / running_var are our BatchStats mean / var; its num_batches_tracked is
accepted on import and not kept (mmcv's SyncBN has momentum 0.1, so PyTorch never reads it); the
export writes it as int64 0.
"""
import sys

from adaptor_jax.convert import state_dict as sd
from adaptor_jax.convert import vmamba
from adaptor_jax.models.upernet import UperNet

PRESETS = ("upernet_vmamba_tiny", "upernet_vmamba_small", "upernet_vmamba_base")

_conv, _same = sd.conv, sd.same


def _bn(theirs, ours):
  return [(f"{theirs}.weight", (*ours, "scale"), _same), (f"{theirs}.bias", (*ours, "bias"), _same),
          (f"{theirs}.running_mean", (*ours, "mean"), _same),
          (f"{theirs}.running_var", (*ours, "var"), _same),
          (f"{theirs}.num_batches_tracked", None, sd.COUNTER)]


def _conv_module(theirs, ours):
  return ([(f"{theirs}.conv.weight", (*ours, "conv", "kernel"), _conv)]
          + _bn(f"{theirs}.bn", (*ours, "bn")))


def layout(model):
  """[(official key, our path, (to ours, to theirs))] for an UperNet, in the official order
  (state_dict order of mmseg's EncoderDecoder: backbone, decode_head, auxiliary_head)."""
  entries = [(f"backbone.{key}", ("backbone", *path), transform)
             for key, path, transform in vmamba.layout(model.backbone)
             if not key.startswith("classifier.")]
  for i in range(len(model.outnorms)):
    entries += [(f"backbone.outnorm{i}.weight", ("outnorms", i, "scale"), _same),
                (f"backbone.outnorm{i}.bias", ("outnorms", i, "bias"), _same)]
  # mmseg's BaseDecodeHead.__init__ makes conv_seg before its subclass makes its ConvModules,
  # so conv_seg leads each head's keys.
  head, d, o = model.decode_head, "decode_head", ("decode_head",)
  entries += _conv_seg(d, o)
  for i in range(len(head.psp_modules)):  # PPM: (AdaptiveAvgPool2d, ConvModule) each
    entries += _conv_module(f"{d}.psp_modules.{i}.1", (*o, "psp_modules", i))
  entries += _conv_module(f"{d}.bottleneck", (*o, "bottleneck"))
  for i in range(len(head.lateral_convs)):
    entries += _conv_module(f"{d}.lateral_convs.{i}", (*o, "lateral_convs", i))
  for i in range(len(head.fpn_convs)):
    entries += _conv_module(f"{d}.fpn_convs.{i}", (*o, "fpn_convs", i))
  entries += _conv_module(f"{d}.fpn_bottleneck", (*o, "fpn_bottleneck"))
  a, o = "auxiliary_head", ("auxiliary_head",)
  entries += _conv_seg(a, o)
  for i in range(len(model.auxiliary_head.convs)):
    entries += _conv_module(f"{a}.convs.{i}", (*o, "convs", i))
  return entries


def _conv_seg(theirs, ours):
  return [(f"{theirs}.conv_seg.weight", (*ours, "conv_seg", "kernel"), _conv),
          (f"{theirs}.conv_seg.bias", (*ours, "conv_seg", "bias"), _same)]


def from_state_dict(model, state_dict):
  """Loads an official UperNet state dict (name -> array) into `model` in place: every official
  key with its shape, every param and BatchNorm statistic covered. Raises ValueError naming the
  missing, unexpected or mis-shaped keys."""
  sd.load(model, state_dict, layout(model), "VMamba UperNet")


def to_state_dict(model):
  """The model as an official UperNet state dict of numpy arrays (official key order)."""
  return sd.dump(model, layout(model))


read_checkpoint, write_checkpoint = sd.read_checkpoint, sd.write_checkpoint
save, restore = sd.save, sd.restore


FAMILY, HEAD_BIAS, MODEL_CLASS, KEY = ("VMamba UperNet", "decode_head.conv_seg.bias", UperNet,
                                       "state_dict")


def needs_init(preset):
  """Whether an import into `preset` initialises params the checkpoint lacks: never."""
  del preset
  return False


def check_export(model, where):
  """Refuses a model the official layout cannot hold (a backbone with adaptors)."""
  if model.backbone.form != "none":
    raise sd.CheckpointMismatch(f"--export: {where} holds an UperNet whose backbone has adaptors "
                                f"(form {model.backbone.form}); the official VMamba UperNet layout "
                                "has no place for them")


if __name__ == "__main__":
  sd.cli(sys.modules[__name__])
