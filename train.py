"""Trains a model: python train.py --config=configs/b2.py --workdir=DIR [--config.key=value ...].

Resumes from the newest checkpoint in --workdir. A bad flag, config key or value, checkpoint or
dataset ends in one line naming it, exit code 2 for the command line, 1 for the rest, 75 for a
lost host (adaptor_jax/commands.py). On several hosts, run the same command on each
(jax.distributed is initialised from the launcher's environment, or from the flags below).
"""
from absl import app, flags
from ml_collections import config_flags

from adaptor_jax import commands
from adaptor_jax.training import cli, hosts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, config.json.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (multi-process runs without a "
                                   "launcher that jax.distributed detects)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from adaptor_jax.training import config as config_lib  # noqa: PLC0415
  config_lib.validate(_CONFIG.value)  # a bad key or value stops here, before any compute
  hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                   timeout_s=_CONFIG.value.host_timeout_s)
  from adaptor_jax.training import loop  # noqa: PLC0415
  with hosts.watched():  # several hosts: a lost process ends the job in one line (hosts.py)
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  commands.run(main, flags_parser=cli.parse_flags)
