"""UserError: the base of every error that means "your input or your run needs fixing" (a
config key, a checkpoint, a dataset, a diverged run), raised with a one-line message naming
what and where. train.py and eval.py print it as that line and exit 1, without a traceback;
anything else is a bug and keeps its traceback. Importable from every layer (it imports
nothing)."""


class UserError(Exception):
  """A mistake to fix outside the code; the message is one line naming the key, file or step."""
