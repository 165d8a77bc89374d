"""Evaluates a run: python eval.py --workdir=DIR [--config=configs/demo.py] [--split=validation].

Prints one JSON line last: top1 and top5 (of the EMA weights when the run kept them, else the
raw ones), raw_top1/raw_top5 (and ema_top1/ema_top5), n and images_per_s.
--workdir may also be a checkpoint step directory (DIR/checkpoints/<step>).
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
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from adaptor_jax.training import config as config_lib, loop  # noqa: PLC0415
  if _CONFIG.value is not None:
    config_lib.validate(_CONFIG.value)
  hosts.initialize()
  with hosts.watched():
    result = loop.evaluate_checkpoint(_WORKDIR.value, _CONFIG.value, _SPLIT.value)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  commands.run(main, flags_parser=cli.parse_flags)
