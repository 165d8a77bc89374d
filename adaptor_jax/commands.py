"""What every command line shares: train.py, eval.py, `python -m adaptor_jax.data.builders`, the
converters and `python -m adaptor_jax.summary`.

  commands.run(main)              # absl's app.run, with what follows

A user's mistake ends in one line on stderr, `PROG: what is wrong and what to do`, and an exit
code that says which kind it was:
  2   the command line itself: a flag that is unknown, missing, or of the wrong type, a config
      file that does not load or a bad `:arg` of one (training/cli.py adds the --config keys)
  1   what the flags name: a dataset that is not prepared, a checkpoint that is missing or does
      not fit, a bad config value, a diverged run (errors.UserError)
  75  a multi-host job lost a process (training/hosts.py): run the same command again
Anything else is a bug and keeps its traceback.

The console shows what the command itself prints; the libraries' INFO logging (absl, orbax,
TFDS) is off unless asked for with absl's --verbosity=0 (or -v 1 for debug); their warnings
stay.
"""
import functools
import os
import sys

from absl import app, flags, logging

from adaptor_jax import errors

USAGE, USER_ERROR = 2, 1


def prog():
  """The command as the user typed it: `train.py`, or `adaptor_jax.data.builders` for -m."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name and spec.name != "__main__":
    return spec.name
  return os.path.basename(sys.argv[0])


def say(message, code):
  """Prints `PROG: message` on stderr and exits with `code`."""
  sys.stdout.flush()
  print(f"{prog()}: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def first_line(text):
  """The last non-empty line of an error's text, without a leading `SomeError: ` (absl wraps a
  config file's own exception in its message)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  line = lines[-1] if lines else ""
  head, sep, rest = line.partition(": ")
  if sep and head.isidentifier() and head.endswith(("Error", "Exception")):
    return rest
  return line


def parse_flags(argv):
  """absl's flag parsing, a bad flag ending in one line (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    say(f"{first_line(e)} (--help lists the flags)", USAGE)


def main(fn):
  """`fn` (an absl main) with user errors as one line (exit 1), usage errors too (exit 2), and
  the libraries' INFO logging off unless --verbosity was given."""
  @functools.wraps(fn)
  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return fn(argv)
    except app.UsageError as e:
      say(str(e), USAGE)
    except errors.UserError as e:
      say(str(e), USER_ERROR)
  return wrapped


def run(fn, flags_parser=parse_flags):
  """app.run(main(fn)) with one-line flag errors."""
  app.run(main(fn), flags_parser=flags_parser)
