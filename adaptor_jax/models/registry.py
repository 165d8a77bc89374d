"""Presets by name: `create_model(name, *, num_classes=1000, rngs, **overrides)` and `list_models()`.

Measured counts (python -m adaptor_jax.summary) are in the README; tests/test_models.py asserts them.
"""
import jax
from flax import nnx

from adaptor_jax import errors
from adaptor_jax.models import deit, maskrcnn, upernet, vim, vmamba
from adaptor_jax.models.vmamba import VSSM

_TINY = dict(dims=(96, 192, 384, 768), depths=(2, 2, 8, 2), ssm_ratio=1.0, drop_path_rate=0.2)
_SMALL = dict(dims=(96, 192, 384, 768), depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(dims=(128, 256, 512, 1024), depths=(2, 2, 15, 2), ssm_ratio=2.0, drop_path_rate=0.6)

VMAMBA_PRESETS = {
    "mamba_adaptor_b1": dict(dims=(40, 80, 160, 320), depths=(2, 2, 9, 2), ssm_ratio=2.0,
                             drop_path_rate=0.1, form="backbone"),
    "mamba_adaptor_b2": dict(dims=(96, 192, 384, 768), depths=(2, 2, 5, 2), ssm_ratio=2.0,
                             drop_path_rate=0.2, form="backbone"),
    "vmamba_tiny": _TINY,
    "vmamba_small": _SMALL,
    "vmamba_base": _BASE,
    "adaptor_vmamba_tiny": dict(_TINY, form="booster"),
    "adaptor_vmamba_small": dict(_SMALL, form="booster"),
    "adaptor_vmamba_base": dict(_BASE, form="booster"),
}


def trainable(model, *, head_only=False):
  """The nnx filter of the params that train, as the model's family declares them (vmamba: the
  adaptor form trains its adaptors and classifier; head_only: the classifier only)."""
  if isinstance(model, VSSM):
    return vmamba.trainable(model, head_only=head_only)
  if head_only:
    raise ValueError(f"linear probing applies to the VMamba family, not {type(model).__name__}")
  return nnx.Param


def trainable_mask(model, *, head_only=False):
  """trainable() as a pure-dict mask of bools; None when every param trains."""
  if trainable(model, head_only=head_only) is nnx.Param:
    return None
  return nnx.to_pure_dict(vmamba.trainable_mask(model, head_only=head_only))


def decay_mask(params):
  """True where weight decay applies: params of 2+ dims other than biases and the names a model
  family declares in its NO_WEIGHT_DECAY (SSM constants, gains, tokens)."""
  names = set(vmamba.NO_WEIGHT_DECAY + vim.NO_WEIGHT_DECAY + deit.NO_WEIGHT_DECAY)

  def one(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    return x.ndim >= 2 and not name.endswith("bias") and name not in names
  return jax.tree_util.tree_map_with_path(one, params)


# UperNet on a VMamba-family backbone preset (semantic segmentation, models/upernet.py).
UPERNET_PRESETS = {f"upernet_{short}": backbone for short, backbone in (
    ("b1", "mamba_adaptor_b1"), ("b2", "mamba_adaptor_b2"), ("vmamba_tiny", "vmamba_tiny"),
    ("vmamba_small", "vmamba_small"), ("vmamba_base", "vmamba_base"))}
_UPERNET_OWN = ("channels", "aux_channels", "aux_stage", "dropout", "dtype")
# Mask R-CNN on the same backbones (COCO detection, models/maskrcnn.py).
MASKRCNN_PRESETS = {f"maskrcnn_{short}": backbone for short, backbone in (
    ("b1", "mamba_adaptor_b1"), ("b2", "mamba_adaptor_b2"), ("vmamba_tiny", "vmamba_tiny"),
    ("vmamba_small", "vmamba_small"), ("vmamba_base", "vmamba_base"))}
_MASKRCNN_OWN = ("channels", "dtype")


def list_models():
  """Every preset name."""
  return (sorted(VMAMBA_PRESETS) + sorted(vim.PRESETS) + sorted(deit.PRESETS)
          + sorted(UPERNET_PRESETS) + sorted(MASKRCNN_PRESETS))


def task_of(name):
  """The task a preset is trained for (training/tasks.py): segmentation for upernet_*, detection
  for maskrcnn_* (no task trains it yet)."""
  if name in MASKRCNN_PRESETS:
    return "detection"
  return "segmentation" if name in UPERNET_PRESETS else "classification"


def from_classifier(name):
  """How a dense preset starts from a classifier of its backbone: (the prefix of its backbone's
  params, the classifier's parts it leaves out, its own parts that start at init); None for a
  classifier."""
  if name in MASKRCNN_PRESETS:
    return maskrcnn.FROM_CLASSIFIER
  return upernet.FROM_CLASSIFIER if name in UPERNET_PRESETS else None


def is_vmamba(name):
  """Whether preset `name` is of the VMamba family or has a VMamba backbone (forms, adaptors)."""
  return name in VMAMBA_PRESETS or name in UPERNET_PRESETS or name in MASKRCNN_PRESETS


def has_scan(name):
  """Whether preset `name` runs the selective scan (its constructor takes scan_backend)."""
  return name not in deit.PRESETS


def create_model(name, *, num_classes=1000, rngs: nnx.Rngs, **overrides):
  """The preset `name` with `num_classes` outputs; `overrides` replace constructor arguments.

  E.g. create_model("vmamba_tiny", form="adaptor", share_adaptor=True, num_classes=37, rngs=...)
  builds the parallel-adaptor transfer form on VMamba-T; dtype=jnp.bfloat16 sets compute dtype;
  create_model("deit_tiny", attention="plain", rngs=...) the explicit-einsum attention.
  The model takes images (B, H, W, 3) float and returns logits (B, num_classes).
  """
  if name in VMAMBA_PRESETS:
    return VSSM(**{**VMAMBA_PRESETS[name], **overrides}, num_classes=num_classes, rngs=rngs)
  if name in vim.PRESETS:
    return vim.Vim(**{**vim.PRESETS[name], **overrides}, num_classes=num_classes, rngs=rngs)
  if name in deit.PRESETS:
    return deit.DeiT(**{**deit.PRESETS[name], **overrides}, num_classes=num_classes, rngs=rngs)
  if name in UPERNET_PRESETS:  # overrides of the backbone go to it, the heads' stay
    own = {k: v for k, v in overrides.items() if k in _UPERNET_OWN}
    backbone = {**VMAMBA_PRESETS[UPERNET_PRESETS[name]],
                **{k: v for k, v in overrides.items() if k not in _UPERNET_OWN}}
    return upernet.UperNet(backbone=backbone, num_classes=num_classes, rngs=rngs, **own)
  if name in MASKRCNN_PRESETS:
    own = {k: v for k, v in overrides.items() if k in _MASKRCNN_OWN}
    backbone = {**VMAMBA_PRESETS[MASKRCNN_PRESETS[name]],
                **{k: v for k, v in overrides.items() if k not in _MASKRCNN_OWN}}
    return maskrcnn.MaskRCNN(backbone=backbone, num_classes=num_classes, rngs=rngs, **own)
  raise UnknownModel(f"create_model: unknown model {name!r}; choose one of {list_models()}")


class UnknownModel(errors.UserError, ValueError):
  """A model name that is not a preset."""
