"""Print a preset's parameter count and GFLOPs (multiply-adds, counted like fvcore).

  python -m adaptor_jax.summary --model=vmamba_tiny [--image_size=224] [--num_classes=1000]
  python -m adaptor_jax.summary --model=all
"""
import json

import jax
from absl import app, flags
from flax import nnx

from adaptor_jax.models import counting, registry

_MODEL = flags.DEFINE_string("model", None, "A preset name (see list_models()) or 'all'.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Square input resolution.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classifier outputs.")


def summarize(name, image_size=224, num_classes=1000):
  """{'model', 'params', 'gflops', 'image_size'} for a preset; builds it abstractly (no weights)."""
  model = nnx.eval_shape(lambda: registry.create_model(name, num_classes=num_classes,
                                                       rngs=nnx.Rngs(0)))
  by_kind = {}
  flops = counting.count_flops(model, image_size, by_kind=by_kind)
  return dict(model=name, image_size=image_size, params=counting.count_params(model),
              gflops=round(flops / 1e9, 4), gflops_by_op={k: round(v / 1e9, 4)
                                                          for k, v in sorted(by_kind.items())})


def main(argv):
  del argv
  if _MODEL.value is None:
    raise app.UsageError(f"--model is required; one of {registry.list_models()} or 'all'")
  names = registry.list_models() if _MODEL.value == "all" else [_MODEL.value]
  for name in names:
    s = summarize(name, _IMAGE_SIZE.value, _NUM_CLASSES.value)
    print(f"{s['model']:<24} params {s['params']:>12,}   GFLOPs {s['gflops']:8.3f}"
          f"   ({s['image_size']}x{s['image_size']})")
  if len(names) == 1:
    print(json.dumps(s))


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  app.run(main)
