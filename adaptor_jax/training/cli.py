"""What train.py and eval.py share around absl: flag parsing whose bad --config file, key, type
or value ends in one line naming it, and user errors (errors.UserError) printed as one line.

  app.run(cli.main(main), flags_parser=cli.parse_flags)
"""
import functools
import os
import sys

from absl import flags

from adaptor_jax import errors


def _say(message, code):
  print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr)
  sys.exit(code)


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
  """absl's flag parsing; a bad flag or --config override exits 2 with one line."""
  try:
    args = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.keys()  # a config file that failed to load raises only when read
    return args
  except (flags.Error, OSError) as e:  # a config file's own error is its message's last line
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _say(lines[-1] if len(lines) > 1 else f"{e} (--help lists the flags)", 2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections overrides
    unknown = _unknown_keys(argv)
    if unknown:
      _say(f"{unknown[0]}: unknown key; every key is documented in "
           "adaptor_jax/training/config.py", 2)
    _say(f"bad --config: {str(e).strip(chr(34))}", 2)


def main(fn):
  """`fn` (an absl main) with user errors printed as one line and exit code 1."""
  @functools.wraps(fn)
  def wrapped(argv):
    try:
      return fn(argv)
    except errors.UserError as e:
      _say(str(e), 1)
  return wrapped
