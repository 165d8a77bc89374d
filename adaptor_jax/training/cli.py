"""The flag parsing train.py and eval.py add to adaptor_jax/commands.py: a bad --config file,
`:arg`, key, type or value ends in one line naming it (exit 2).

  commands.run(main, flags_parser=cli.parse_flags)
"""
import re

from absl import flags

from adaptor_jax import commands


def _unknown_keys(argv):
  """The --config.KEY overrides in argv whose KEY is not a training config key."""
  from adaptor_jax.training import config as config_lib  # noqa: PLC0415 - after flags only
  known, bad = config_lib.default_config(), []
  for arg in argv[1:]:
    if arg.startswith("--config.") and "=" in arg:
      node = known
      for part in arg[len("--config."):].split("=", 1)[0].split("."):
        if not hasattr(node, "keys") or part not in node:
          bad.append(arg.split("=", 1)[0][2:])
          break
        node = node[part]
  return bad


def parse_flags(argv):
  """absl's flag parsing; a bad flag, --config file or override exits 2 with one line."""
  try:
    args = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.keys()  # a config file that failed to load raises only when read
    return args
  except (flags.Error, OSError) as e:  # a config file's own error is its message's last line
    missing = re.search(r"No such file or directory: '(.*)'", str(e))
    if missing:  # the config file itself (ml_collections wraps the OSError)
      commands.say(f"--config: no such file {missing.group(1)}", commands.USAGE)
    lines = [line for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1:
      commands.say(commands.first_line(e), commands.USAGE)
    commands.say(f"{e} (--help lists the flags)", commands.USAGE)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections overrides
    unknown = _unknown_keys(argv)
    if unknown:
      commands.say(f"{unknown[0]}: unknown key; every key is documented in "
                   "adaptor_jax/training/config.py", commands.USAGE)
    commands.say(f"bad --config: {str(e).strip(chr(34))}", commands.USAGE)
