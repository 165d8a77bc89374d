"""timm DeiT checkpoints (deit_{tiny,small,base}_patch16_224, timm's VisionTransformer) <-> our params.

Import:  python -m adaptor_jax.convert.deit --checkpoint=FILE --model=deit_tiny --output=DIR
Export:  python -m adaptor_jax.convert.deit --export --input=DIR --checkpoint=OUT.pth|.npz
FILE: a timm state dict as .safetensors (what the hub ships), a torch checkpoint (DeiT's own
releases hold it under --key "model") or an .npz of the same keys, which needs no torch. DIR is
an orbax checkpoint of the params plus `model.json` naming the preset (state_dict.py); the
number of classes is read from head.bias. The distilled models (dist_token, head_dist) and
other resolutions (a pos_embed of another length) are not these presets: their keys are named
as unexpected or mis-shaped.

Layout: PyTorch Linear weights are (out, in), ours (in, out); the patch conv (out, in, kh, kw),
ours (kh, kw, in, out); cls_token (1, 1, D) and pos_embed (1, M + 1, D) are (D,) and (M + 1, D)
here; LayerNorm weight is our scale. qkv keeps timm's output order (q, k, v, each head-major).
"""
import sys

import numpy as np

from adaptor_jax.convert import state_dict as sd
from adaptor_jax.models.deit import PRESETS as _MODELS, DeiT

PRESETS = tuple(_MODELS)
FAMILY, HEAD_BIAS, MODEL_CLASS = "DeiT", "head.bias", DeiT

_linear, _conv, _same = sd.linear, sd.conv, sd.same
_cls = (lambda w: np.squeeze(w, (0, 1)), lambda p: p[None, None])   # (1, 1, D) <-> (D,)
_pos = (lambda w: np.squeeze(w, 0), lambda p: p[None])             # (1, L, D) <-> (L, D)


def _norm(theirs, ours):
  return [(f"{theirs}.weight", (*ours, "scale"), _same), (f"{theirs}.bias", (*ours, "bias"), _same)]


def _layer(theirs, ours, kind):
  return [(f"{theirs}.weight", (*ours, "kernel"), kind), (f"{theirs}.bias", (*ours, "bias"), _same)]


def layout(model):
  """[(timm key, our param path, (to ours, to theirs))] for a DeiT, in timm's order."""
  entries = ([("cls_token", ("cls_token",), _cls), ("pos_embed", ("pos_embed",), _pos)]
             + _layer("patch_embed.proj", ("patch_embed",), _conv))
  for i in range(len(model.blocks)):
    t, o = f"blocks.{i}", ("blocks", i)
    entries += (_norm(f"{t}.norm1", (*o, "norm1"))
                + _layer(f"{t}.attn.qkv", (*o, "attn", "qkv"), _linear)
                + _layer(f"{t}.attn.proj", (*o, "attn", "proj"), _linear)
                + _norm(f"{t}.norm2", (*o, "norm2"))
                + _layer(f"{t}.mlp.fc1", (*o, "mlp", "fc1"), _linear)
                + _layer(f"{t}.mlp.fc2", (*o, "mlp", "fc2"), _linear))
  return entries + _norm("norm", ("norm",)) + _layer("head", ("head",), _linear)


def from_state_dict(model, state_dict):
  """Loads a timm DeiT state dict (name -> array) into `model` in place: every key with its
  shape, every param covered. Raises ValueError naming the missing, unexpected or mis-shaped
  keys."""
  sd.load(model, state_dict, layout(model), FAMILY)


def to_state_dict(model):
  """The model's params as a timm DeiT state dict of numpy arrays (timm's key order)."""
  return sd.dump(model, layout(model))


read_checkpoint, write_checkpoint = sd.read_checkpoint, sd.write_checkpoint
save, restore = sd.save, sd.restore


def needs_init(preset):
  """Whether an import into `preset` initialises params the checkpoint lacks: never for DeiT."""
  del preset
  return False


def check_export(model, where):
  """Every DeiT fits timm's layout (the attention implementation is not a param): nothing to
  refuse."""
  del model, where


if __name__ == "__main__":
  sd.cli(sys.modules[__name__])
