"""Print a preset's parameter count and GFLOPs (multiply-adds, counted like fvcore).

  python -m adaptor_jax.summary --model=vmamba_tiny [--image_size=224] [--num_classes=1000]
  python -m adaptor_jax.summary --model=upernet_vmamba_tiny --num_classes=150 --image_size=512x2048
  python -m adaptor_jax.summary --model=all
  python -m adaptor_jax.summary --model=vmamba_tiny --num_classes=100 --form=adaptor \
      [--share_adaptor] [--head_only]     # + the params that train (configs/transfer.py)
"""
import json

import jax
from absl import app, flags
from flax import nnx

from adaptor_jax import commands
from adaptor_jax.models import counting, registry, vmamba

def _define_flags():
  """The CLI's flags (defined only when run as a script, so importers' flags never clash)."""
  flags.DEFINE_string("model", None, "A preset name (see list_models()) or 'all'.")
  flags.DEFINE_string("image_size", "224", "Input resolution: S (square) or HxW.")
  flags.DEFINE_integer("num_classes", 1000, "Classifier outputs.")
  flags.DEFINE_enum("form", None, vmamba.FORMS, "VMamba family: the form (default: the preset's).")
  flags.DEFINE_bool("share_adaptor", False, "form=adaptor: one adaptor per stage.")
  flags.DEFINE_bool("head_only", False, "Count linear probing's trainable params.")


def summarize(name, image_size=224, num_classes=1000, head_only=False, **overrides):
  """{'model', 'params', 'trainable', 'gflops', 'image_size'} for a preset (create_model
  `overrides`, e.g. form="adaptor"); builds it abstractly (no weights). trainable: the params
  registry.trainable picks (all, except in the adaptor form and with head_only). image_size:
  S or (H, W). A segmentation model's FLOPs leave out its auxiliary head (it runs in training
  only; mmseg's get_flops removes it too), its params count it."""
  model = nnx.eval_shape(lambda: registry.create_model(name, num_classes=num_classes,
                                                       rngs=nnx.Rngs(0), **overrides))
  by_kind = {}
  flops = counting.count_flops(model, image_size, by_kind=by_kind)
  params = counting.count_params(model)
  trainable = counting.count_params(model, registry.trainable(model, head_only=head_only))
  return dict(model=name, image_size=image_size, params=params, trainable=trainable,
              gflops=round(flops / 1e9, 4), gflops_by_op={k: round(v / 1e9, 4)
                                                          for k, v in sorted(by_kind.items())})


def main(argv):
  del argv
  f = flags.FLAGS
  if f.model is None:
    raise app.UsageError(f"--model is required; one of {registry.list_models()} or 'all'")
  names = registry.list_models() if f.model == "all" else [f.model]
  if names[0] not in registry.list_models():
    raise app.UsageError(f"--model={f.model}: not a preset; one of {registry.list_models()} or "
                         "'all'")
  try:
    size = tuple(int(n) for n in f.image_size.lower().split("x"))
  except ValueError:
    size = ()
  if len(size) not in (1, 2) or min(size) < 1:
    raise app.UsageError(f"--image_size={f.image_size}: give S or HxW, e.g. 224 or 512x2048")
  size = size[0] if len(size) == 1 else size
  overrides = {}
  if f.form:
    overrides = dict(form=f.form, share_adaptor=f.share_adaptor)
  for name in names:
    s = summarize(name, size, f.num_classes, f.head_only, **overrides)
    trains = (f"   trainable {s['trainable']:>11,} ({s['trainable'] / s['params']:.2%})"
              if s["trainable"] != s["params"] else "")
    shown = size if isinstance(size, tuple) else (size, size)
    print(f"{s['model']:<24} params {s['params']:>12,}   GFLOPs {s['gflops']:8.3f}"
          f"   ({shown[0]}x{shown[1]}){trains}")
  if len(names) == 1:
    print(json.dumps(s))


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  _define_flags()
  commands.run(main)
