"""Evaluates a run: python eval.py --workdir=DIR [--config=configs/demo.py] [--split=validation].

Prints one JSON line last: top1 and top5 (of the EMA weights when the run kept them, else the
raw ones), raw_top1/raw_top5 (and ema_top1/ema_top5), n and images_per_s; for segmentation
miou, macc, aacc (mmseg's IoUMetric) and "per_class": the file of per-class IoU and accuracy
(WORKDIR/eval/step_<N>_<split>[_multiscale].json). --multiscale: mmseg's multi-scale and flip test.
--workdir may also be a checkpoint step directory (DIR/checkpoints/<step>), or a converted
checkpoint (official weights, adaptor_jax.convert) with --config naming its task and data.
"""
import json

from absl import app, flags
from ml_collections import config_flags

from adaptor_jax import commands
from adaptor_jax.training import cli, hosts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg]; default: the "
                                          "checkpoint's own config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir or checkpoint step dir.")
_SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default config.data.eval_split).")
_MULTISCALE = flags.DEFINE_bool("multiscale", False, "Segmentation: mmseg's multi-scale and flip "
                                "test (views at 0.5-1.75 x the original size, each flipped too).")
MULTISCALE = dict(eval_ratios=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), eval_flip=True)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from adaptor_jax.training import config as config_lib, loop  # noqa: PLC0415
  if _CONFIG.value is not None:
    config_lib.validate(_CONFIG.value)
  hosts.initialize()
  with hosts.watched():
    result = loop.evaluate_checkpoint(_WORKDIR.value, _CONFIG.value, _SPLIT.value,
                                      MULTISCALE if _MULTISCALE.value else None)
  per_class = {k: result.pop(k) for k in list(result) if isinstance(result[k], list)}
  if per_class:
    result["per_class"] = str(_write_per_class(per_class))
  print(json.dumps(result), flush=True)


def _write_per_class(per_class):
  """WORKDIR/eval/step_<N>_<split>[_multiscale].json (a converted checkpoint's: DIR/eval/<split>
  [_multiscale].json): {"classes": [...], "iou": [...], "acc": [...], ...}."""
  import jax  # noqa: PLC0415
  from adaptor_jax import paths  # noqa: PLC0415
  from adaptor_jax.training import loader  # noqa: PLC0415
  found = loader.find(_WORKDIR.value, what="--workdir")
  config = loader.read_config(found) if _CONFIG.value is None else _CONFIG.value
  split = _SPLIT.value or config.data.eval_split
  name = f"{split}{'_multiscale' if _MULTISCALE.value else ''}.json"
  if found.kind == "converted":  # official weights: their directory
    path = found.path / "eval" / name
  else:
    path = found.step_dir.parent.parent / "eval" / f"step_{found.step_dir.name}_{name}"
  if jax.process_index() == 0:
    paths.write_text(path, json.dumps(per_class, indent=1))
  return path


if __name__ == "__main__":
  commands.run(main, flags_parser=cli.parse_flags)
