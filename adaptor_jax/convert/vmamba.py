"""Official VMamba v2 checkpoints (MzeroMiko/VMamba, classification/models/vmamba.py) <-> our params.

Import:  python -m adaptor_jax.convert.vmamba --checkpoint=FILE.pth --model=vmamba_tiny --output=DIR
Export:  python -m adaptor_jax.convert.vmamba --export --input=DIR --checkpoint=OUT.pth
DIR: a converter output, a training workdir (its newest checkpoint, EMA params when kept) or a
step directory; a model with adaptors cannot be exported (the official layout has no place).
FILE is a torch checkpoint holding the state dict under --key ("model" or "model_ema"), or a bare
state dict; a .npz of the same keys also works and needs no torch (torch is the `convert` extra).
The adaptor_vmamba_* presets take the VMamba weights and keep their adaptors as the booster form
initialises them. DIR is an orbax checkpoint of the params plus `model.json` naming the preset
(the machinery every importer shares is in state_dict.py).

Layout: PyTorch Linear weights are (out, in), ours (in, out); conv weights (out, in, kh, kw), ours
(kh, kw, in, out); the per-route SS2D tensors stack the 4 routes first in both (A_logs and Ds
flattened as route * Di + channel there), and x_proj / dt_proj are transposed like Linear weights.
"""
import sys

from flax import nnx

from adaptor_jax.convert import state_dict as sd
from adaptor_jax.models.vmamba import VSSM

PRESETS = ("vmamba_tiny", "vmamba_small", "vmamba_base",
           "adaptor_vmamba_tiny", "adaptor_vmamba_small", "adaptor_vmamba_base")

_linear, _conv, _same = sd.linear, sd.conv, sd.same    # Linear2d may store (o, i, 1, 1)
_routes_T = (lambda w: w.transpose(0, 2, 1), lambda p: p.transpose(0, 2, 1))


def _by_route(di):
  return (lambda w: w.reshape(4, di, *w.shape[1:]), lambda p: p.reshape(4 * di, *p.shape[2:]))


def _norm(theirs, ours):
  return [(f"{theirs}.weight", (*ours, "scale"), _same), (f"{theirs}.bias", (*ours, "bias"), _same)]


def _layer(theirs, ours, kind, bias=True):
  entries = [(f"{theirs}.weight", (*ours, "kernel"), kind)]
  return entries + ([(f"{theirs}.bias", (*ours, "bias"), _same)] if bias else [])


def layout(model):
  """[(official key, our param path, (to ours, to theirs))] for a VSSM, in the official order."""
  entries = (_layer("patch_embed.0", ("patch_embed", "conv1"), _conv)
             + _norm("patch_embed.2", ("patch_embed", "norm1"))
             + _layer("patch_embed.5", ("patch_embed", "conv2"), _conv)
             + _norm("patch_embed.7", ("patch_embed", "norm2")))
  for i, stage in enumerate(model.stages):
    for j, block in enumerate(stage["blocks"]):
      t, o = f"layers.{i}.blocks.{j}", ("stages", i, "blocks", j)
      op = (*o, "op")
      entries += _norm(f"{t}.norm", (*o, "norm")) + [
          (f"{t}.op.x_proj_weight", (*op, "x_proj"), _routes_T),
          (f"{t}.op.A_logs", (*op, "A_log"), _by_route(block.op.d_inner)),
          (f"{t}.op.Ds", (*op, "D"), _by_route(block.op.d_inner)),
          (f"{t}.op.dt_projs_weight", (*op, "dt_proj"), _routes_T),
          (f"{t}.op.dt_projs_bias", (*op, "dt_bias"), _same),
      ] + (_norm(f"{t}.op.out_norm", (*op, "out_norm"))
           + _layer(f"{t}.op.in_proj", (*op, "in_proj"), _linear, bias=False)
           + _layer(f"{t}.op.conv2d", (*op, "conv2d"), _conv, bias=False)
           + _layer(f"{t}.op.out_proj", (*op, "out_proj"), _linear, bias=False)
           + _norm(f"{t}.norm2", (*o, "norm2"))
           + _layer(f"{t}.mlp.fc1", (*o, "mlp", "fc1"), _linear)
           + _layer(f"{t}.mlp.fc2", (*o, "mlp", "fc2"), _linear))
    if stage["downsample"] is not None:
      entries += (_layer(f"layers.{i}.downsample.1", ("stages", i, "downsample", "conv"), _conv)
                  + _norm(f"layers.{i}.downsample.3", ("stages", i, "downsample", "norm")))
  return entries + _norm("classifier.norm", ("head_norm",)) + _layer(
      "classifier.head", ("head",), _linear)


def _is_adaptor(path):
  return "adaptor_t" in path or "adaptor_s" in path


def from_state_dict(model, state_dict):
  """Loads an official state dict (name -> array) into `model` in place: every official key with
  its shape, every param covered except the adaptors of the booster and adaptor forms, which keep
  their values. Raises ValueError naming the missing, unexpected or mis-shaped keys."""
  sd.load(model, state_dict, layout(model), "VMamba", keep=_is_adaptor)


def to_state_dict(model):
  """The model's params as an official VMamba state dict of numpy arrays (official key order)."""
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  adaptors = [p for p in params if _is_adaptor(p)]
  if adaptors:
    raise sd.CheckpointMismatch(f"this model has adaptor params ({len(adaptors)}, e.g. "
                                f"{'/'.join(map(str, adaptors[0]))}), which the VMamba layout "
                                "cannot hold")
  return sd.dump(model, layout(model))


read_checkpoint, write_checkpoint = sd.read_checkpoint, sd.write_checkpoint
save, restore = sd.save, sd.restore


FAMILY, HEAD_BIAS, MODEL_CLASS = "VMamba", "classifier.head.bias", VSSM


def needs_init(preset):
  """Whether an import into `preset` initialises params the checkpoint lacks (its adaptors)."""
  return preset.startswith("adaptor_")


def check_export(model, where):
  """Refuses a model the official layout cannot hold (one with adaptors)."""
  if model.form != "none":
    raise sd.CheckpointMismatch(f"--export: {where} holds a VMamba with adaptors (form "
                                f"{model.form}); the official VMamba layout has no place for "
                                "them")


if __name__ == "__main__":
  sd.cli(sys.modules[__name__])
