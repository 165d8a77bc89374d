"""Official Vim checkpoints (hustvl/Vim, vim/models_mamba.py with mamba-1p1p1's Mamba,
bimamba_type="v2") <-> our params.

Import:  python -m adaptor_jax.convert.vim --checkpoint=FILE.pth --model=vim_tiny --output=DIR
Export:  python -m adaptor_jax.convert.vim --export --input=DIR --checkpoint=OUT.pth
The checkpoints are the releases of the models "vim_{tiny,small}_patch16[_stride8]_224_bimambav2_
final_pool_mean_abs_pos_embed_with_midclstok_div2" (Vim-tiny-midclstok, Vim-small-midclstok; the
"+" rows, fine-tuned at stride 8, go into vim_{tiny,small}_stride8). FILE is a torch checkpoint
holding the state dict under --key ("model", or "model_ema" for the EMA the official training
also saves), a bare state dict, a .safetensors or an .npz of the same keys (the last needs no
torch). DIR is an orbax checkpoint of the params plus `model.json` naming the preset, readable
by adaptor_jax.load_model and usable as --config.init_from (the shared machinery is in
state_dict.py). Every Vim exports.

Layout: PyTorch Linear weights are (out, in), ours (in, out) (in_proj, x_proj(_b), dt_proj(_b),
out_proj, head); the patch embedding's Conv2d (D, 3, 16, 16), ours (16, 16, 3, D); the depthwise
conv1d weights (Di, 1, 4), ours (4, Di). conv1d_b is stored as trained: the official code applies
it, unflipped, causally to the flipped sequence, which is what our anti-causal conv computes at
the original positions (it flips the kernel itself). cls_token (1, 1, D) and pos_embed (1, M + 1,
D) lose their leading ones; both put the cls token at row M // 2 (the official code inserts the
token at M // 2, then adds pos_embed, so row M // 2 is the cls token's in both). A_log / A_b_log,
D / D_b, the dt biases and the RMSNorm weights are the same arrays. The official model has no
buffers.

Keys of other official VisionMamba variants, which this model cannot represent, are refused by
name with the reason (FOREIGN), never dropped: rotary embeddings, two cls tokens, layer scale,
LayerNorm instead of RMSNorm, biased in/out projections, a distillation token or head.
"""
import re
import sys

import jax
import numpy as np
from flax import nnx

from adaptor_jax.convert import state_dict as sd
from adaptor_jax.models import vim as vim_model

PRESETS = tuple(vim_model.PRESETS)

_linear, _conv, _same = sd.linear, sd.conv, sd.same
_conv1d = (lambda w: w[:, 0, :].T, lambda p: p.T[:, None, :])       # (Di, 1, K) <-> (K, Di)
_batch1 = (lambda w: w[0], lambda p: p[None])                       # (1, L, D) <-> (L, D)
_batch11 = (lambda w: w[0, 0], lambda p: p[None, None])             # (1, 1, D) <-> (D,)

# Official keys of VisionMamba options the released midclstok models do not use and our Vim does
# not have: (pattern, why it cannot be loaded). Each changes what the network computes, so none is
# ignored.
FOREIGN = (
    (r"^rope\.", "rotary position embeddings (if_rope=True), which our Vim does not have"),
    (r"^cls_token_(head|tail)$", "two cls tokens at the ends (use_double_cls_token=True); ours "
     "has one in the middle"),
    (r"^(dist_token|head_dist\.)", "a DeiT-style distillation token or head, which our Vim does "
     "not have"),
    (r"^layers\.\d+\.mixer\.gamma$", "layer scale (init_layer_scale), which our Vim does not have"),
    (r"^(layers\.\d+\.norm|norm_f)\.bias$", "LayerNorm (rms_norm=False); our Vim's norms are "
     "RMSNorm, which has no bias"),
    (r"^layers\.\d+\.mixer\.(in|out)_proj\.bias$", "biased in/out projections (Mamba bias=True); "
     "ours have none"),
)


def _layer(theirs, ours, kind, bias=True):
  entries = [(f"{theirs}.weight", (*ours, "kernel"), kind)]
  return entries + ([(f"{theirs}.bias", (*ours, "bias"), _same)] if bias else [])


def _conv1d_entries(theirs, ours):
  return [(f"{theirs}.weight", (*ours, "weight"), _conv1d),
          (f"{theirs}.bias", (*ours, "bias"), _same)]


def layout(model):
  """[(official key, our param path, (to ours, to theirs))] for a Vim, in the official order."""
  entries = ([("cls_token", ("cls_token",), _batch11), ("pos_embed", ("pos_embed",), _batch1)]
             + _layer("patch_embed.proj", ("patch_embed",), _conv)
             + _layer("head", ("head",), _linear))
  for i in range(len(model.layers)):
    t, m = f"layers.{i}.mixer", ("layers", i, "mixer")
    entries += ([(f"{t}.A_log", (*m, "A_log"), _same), (f"{t}.D", (*m, "D"), _same),
                 (f"{t}.A_b_log", (*m, "A_b_log"), _same), (f"{t}.D_b", (*m, "D_b"), _same)]
                + _layer(f"{t}.in_proj", (*m, "in_proj"), _linear, bias=False)
                + _conv1d_entries(f"{t}.conv1d", (*m, "conv1d"))
                + _layer(f"{t}.x_proj", (*m, "x_proj"), _linear, bias=False)
                + _layer(f"{t}.dt_proj", (*m, "dt_proj"), _linear)
                + _conv1d_entries(f"{t}.conv1d_b", (*m, "conv1d_b"))
                + _layer(f"{t}.x_proj_b", (*m, "x_proj_b"), _linear, bias=False)
                + _layer(f"{t}.dt_proj_b", (*m, "dt_proj_b"), _linear)
                + _layer(f"{t}.out_proj", (*m, "out_proj"), _linear, bias=False)
                + [(f"layers.{i}.norm.weight", ("layers", i, "norm", "weight"), _same)])
  return entries + [("norm_f.weight", ("norm_f", "weight"), _same)]


def official_shapes(model):
  """{official key: shape} of the state dict this model exports (works on an abstract model)."""
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  return {key: tuple(jax.eval_shape(to_theirs, params[path].get_value()).shape)
          for key, path, (_, to_theirs) in layout(model)}


def _grid(rows):
  side = int(round((rows - 1) ** 0.5))
  return f"{side}x{side} patches + the cls token" if side * side == rows - 1 else f"{rows} rows"


def _check(model, state_dict):
  """Refuses keys of other official variants and official shapes that differ from this model's,
  each in one line naming the key."""
  for pattern, why in FOREIGN:
    keys = [key for key in state_dict if re.search(pattern, key)]
    if keys:
      raise sd.CheckpointMismatch(f"Vim checkpoint keys {sd._some(keys)} are from an official "
                                  f"variant this model cannot represent: {why}")
  for key, want in official_shapes(model).items():
    if key in state_dict and tuple(np.shape(state_dict[key])) != want:
      got = tuple(np.shape(state_dict[key]))
      hint = ""
      if key == "pos_embed" and len(got) == 3 and len(want) == 3:
        hint = (f" ({_grid(want[1])} against the checkpoint's {_grid(got[1])}: another stride "
                "or image size; import into the preset the checkpoint was trained as)")
      raise sd.CheckpointMismatch(f"Vim checkpoint key {key!r} has shape {got}, this model's "
                                  f"is {want}{hint}")


def from_state_dict(model, state_dict):
  """Loads an official state dict (name -> array) into `model` in place: every official key with
  its official shape, every param covered. Raises ValueError naming a key of another variant
  (FOREIGN) or a missing, unexpected or mis-shaped key."""
  _check(model, state_dict)
  sd.load(model, state_dict, layout(model), "Vim")


def to_state_dict(model):
  """The model's params as an official Vim state dict of numpy arrays (official key order)."""
  return sd.dump(model, layout(model))


read_checkpoint, write_checkpoint = sd.read_checkpoint, sd.write_checkpoint
save, restore = sd.save, sd.restore


FAMILY, HEAD_BIAS, MODEL_CLASS = "Vim", "head.bias", vim_model.Vim


def needs_init(preset):
  """Whether an import into `preset` initialises params the checkpoint lacks: never, a Vim
  checkpoint covers every param."""
  del preset
  return False


def check_export(model, where):
  """Refuses a model the official layout cannot hold: none, every param of every Vim has its
  official key (layout), so there is nothing to refuse."""
  del model, where


if __name__ == "__main__":
  sd.cli(sys.modules[__name__])
