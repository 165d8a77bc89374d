"""What every importer shares: a layout of (official key, our param path, (to ours, to theirs))
entries, applied strictly in both directions; torch / .npz checkpoint files; the converter's
output directory (an orbax checkpoint of the params plus `model.json` naming the preset).

A family's module (vmamba.py, ...) writes its `layout(model)`, from_state_dict / to_state_dict,
and the names `cli` reads (PRESETS, FAMILY, HEAD_BIAS, MODEL_CLASS, check_export,
needs_init; KEY, the default --key, when it is not "model"); its command line
is `cli(module)`:
  python -m adaptor_jax.convert.FAMILY --checkpoint=FILE --model=PRESET --output=DIR [--key=model]
  python -m adaptor_jax.convert.FAMILY --export --input=DIR --checkpoint=OUT.pth|.npz

An entry's path names an nnx.Param or an nnx.BatchStat (BatchNorm's running mean and variance);
its path None marks an official key we have no place for and that holds nothing to keep
(BatchNorm's num_batches_tracked, `COUNTER`): it must be there on import, with its shape, and
is ignored; the export writes it as int64 0 (PyTorch's BatchNorm with a momentum, as every
official model here has, never reads it).
"""
import argparse
import io
import json
import pickle
import zipfile

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from adaptor_jax import commands, errors, paths
from adaptor_jax.models import registry

class CheckpointMismatch(errors.UserError, ValueError):
  """An official checkpoint that does not fit the model (its keys or shapes), or a model the
  official layout cannot hold; the message names the keys."""


class CheckpointUnreadable(errors.UserError, OSError):
  """A checkpoint file that is missing, or that its reader cannot read (the message names it)."""


same = (lambda w: w, lambda p: p)
linear = (lambda w: w.reshape(w.shape[:2]).T, lambda k: k.T)       # (out, in[, 1, 1]) <-> (in, out)
conv = (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))
COUNTER = (lambda n: n, lambda _: np.zeros((), np.int64))  # num_batches_tracked


def _variables(model):
  """{path: nnx Variable} of the model's params and BatchNorm statistics."""
  return dict(nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def _some(keys):
  return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)"


def load(model, state_dict, entries, family, keep=lambda path: False):
  """Loads an official state dict (name -> array) into `model` in place, by `entries`.

  Every official key must be present with its official shape and every param (and BatchNorm
  statistic) of the model must be covered, except those `keep(path)` names, which keep their
  values. Raises ValueError naming the missing, unexpected or first mis-shaped key.
  """
  expected = {key for key, _, _ in entries}
  unexpected = sorted(set(state_dict) - expected)
  missing = [key for key, _, _ in entries if key not in state_dict]
  if missing or unexpected:
    raise CheckpointMismatch(f"{family} checkpoint does not match the model: missing keys "
                     f"{_some(missing)}; unexpected keys {_some(unexpected)}")
  params = _variables(model)
  covered = set()
  for key, path, (to_ours, _) in entries:
    try:
      value = np.asarray(to_ours(np.asarray(state_dict[key], np.float32)))
    except (ValueError, IndexError):  # a rank or size the transform cannot take: mis-shaped
      value = None
    want = () if path is None else params[path].shape
    if value is None or value.shape != tuple(want):
      raise CheckpointMismatch(f"{family} checkpoint key {key!r} has shape "
                       f"{tuple(np.shape(state_dict[key]))}, which does not give this model's "
                       f"{want} for {'/'.join(map(str, path or ('(a scalar)',)))}")
    if path is None:  # COUNTER: accounted for, nothing to keep
      continue
    params[path].set_value(jax.numpy.asarray(value))
    covered.add(path)
  left = [p for p in params if p not in covered and not keep(p)]
  if left:
    raise CheckpointMismatch(f"{family} layout leaves params unset: "
                             f"{['/'.join(map(str, p)) for p in left]}")


def dump(model, entries):
  """The model's params (and BatchNorm statistics) as an official state dict of numpy arrays, in
  the entries' order."""
  params = _variables(model)
  return {key: np.asarray(to_theirs(None if path is None else np.asarray(params[path][...])))
          for key, path, (_, to_theirs) in entries}


def read_checkpoint(path, key="model"):
  """The state dict in a torch checkpoint (under `key` when it is a wrapper dict), a .safetensors
  file or an .npz; `path` may be a URL (read whole into memory)."""
  path = paths.resolve(path, "--checkpoint")
  if not path.is_file():
    raise CheckpointUnreadable(f"{path}: no such file")
  data = path.read_bytes()
  if path.suffix == ".npz":  # arrays only: np.load refuses pickled objects
    if not zipfile.is_zipfile(io.BytesIO(data)):  # np.load would try it as a pickle
      raise CheckpointUnreadable(f"{path}: not an .npz (not a zip archive of .npy arrays)")
    try:
      with np.load(io.BytesIO(data)) as f:
        return {k: f[k] for k in f.files}
    except ValueError as e:
      if "allow_pickle" in str(e):
        raise CheckpointUnreadable(f"{path}: holds pickled objects, which are never loaded (they "
                                   "could run code); save plain arrays (np.savez)") from None
      raise CheckpointUnreadable(f"{path}: not a readable .npz ({_first_line(e)})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
      raise CheckpointUnreadable(f"{path}: not a readable .npz ({_first_line(e)})") from None
  try:
    import torch  # noqa: PLC0415 - optional: pip install -e '.[convert]'
  except ImportError:
    raise CheckpointUnreadable(f"reading {path} needs torch: pip install -e '.[convert]', or "
                               "convert it to .npz where torch is available") from None
  unreadable = (RuntimeError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)
  try:
    if path.suffix == ".safetensors":
      try:
        import safetensors  # noqa: PLC0415 - optional
        from safetensors.torch import load  # noqa: PLC0415
      except ImportError:
        raise CheckpointUnreadable(f"reading {path} needs safetensors: pip install "
                                   "safetensors") from None
      unreadable += (safetensors.SafetensorError,)
      ckpt = load(data)
    else:
      ckpt = _torch_load(torch, data)
  except unreadable as e:
    raise CheckpointUnreadable(f"{path}: not a readable {path.suffix or 'torch'} checkpoint "
                               f"({_first_line(e)})") from None
  if key in ckpt and isinstance(ckpt[key], dict):
    ckpt = ckpt[key]
  elif any(isinstance(v, dict) for v in ckpt.values()):
    raise CheckpointMismatch(f"{path}: no state dict under {key!r}; it holds {sorted(ckpt)}")
  others = [k for k, v in ckpt.items() if not isinstance(v, torch.Tensor)]
  if others:
    raise CheckpointMismatch(f"{path}: not a state dict of tensors under {key!r}: {_some(others)}")
  return {k: v.float().numpy() for k, v in ckpt.items()}


class _StandIn:
  """What an object of a class other than the weights' becomes when read (its code never runs)."""

  def __init__(self, *args, **kwargs):
    pass

  def __setstate__(self, state):
    pass


def _torch_load(torch, data):
  """torch.load with weights_only: tensors and containers, never code. Training checkpoints also
  hold other objects beside the weights (DeiT-style main.py: Vim, ...: the run's argparse args;
  mmengine's, as mmseg saves them: the message hub's history buffers, numpy values): those are
  read as inert _StandIns (their classes are neither imported nor run), and only the state dict
  is used. torch's own refusals (os, sys) stand."""
  def load(extra):
    with torch.serialization.safe_globals([argparse.Namespace, *extra]):
      return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
  try:
    return load([])
  except pickle.UnpicklingError:
    unsafe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch 2.5+
    names = unsafe(io.BytesIO(data)) if unsafe else []
    if not names:
      raise
    return load([(_StandIn, name) for name in names])


def _first_line(e):
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def write_checkpoint(path, state_dict, key="model"):
  """An .npz, or a torch checkpoint {key: state dict}; `path` may be a URL."""
  path = paths.resolve(path, "--checkpoint")
  buffer = io.BytesIO()
  if path.suffix == ".npz":
    np.savez(buffer, **state_dict)
  else:
    import torch  # noqa: PLC0415 - optional
    torch.save({key: {k: torch.from_numpy(np.ascontiguousarray(v))
                      for k, v in state_dict.items()}}, buffer)
  if not paths.is_url(path):
    path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


def save(model, name, directory):
  """An orbax checkpoint of the params, one of BatchNorm's statistics when the model has them
  (`stats`, a pure dict, as a training checkpoint's) and model.json ({"model": name,
  "num_classes": ...}); `directory` may be a URL."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  directory = paths.resolve(directory, "--output")
  paths.check_bucket(directory, "--output")
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory / "params", nnx.state(model, nnx.Param))
    if stats:
      ckptr.save(directory / "stats", stats)
  paths.write_text(directory / "model.json",
                   json.dumps(dict(model=name, num_classes=num_classes(model))))


def num_classes(model):
  """The class count of a classifier (its `head`) or of a dense model (its decode head's
  classifier, mmseg's `decode_head.conv_seg`)."""
  head = model.head if hasattr(model, "head") else model.decode_head.conv_seg
  return int(head.out_features)


def restore(directory, **overrides):
  """The model saved by `save` in `directory` (a path or URL), with its BatchNorm statistics."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  directory = paths.resolve(directory)
  meta = json.loads((directory / "model.json").read_text())
  model = nnx.eval_shape(lambda: registry.create_model(
      meta["model"], num_classes=meta["num_classes"], rngs=nnx.Rngs(0), **overrides))
  target = nnx.state(model, nnx.Param)
  stats = nnx.state(model, nnx.BatchStat)
  with ocp.StandardCheckpointer() as ckptr:
    nnx.update(model, ckptr.restore(directory / "params", target))
    if nnx.to_pure_dict(stats):
      nnx.replace_by_pure_dict(stats, ckptr.restore(directory / "stats",
                                                    nnx.to_pure_dict(stats)))
      nnx.update(model, stats)
  return model


def cli(family):
  """Runs the import / export command line of a family module (see the module docstring)."""
  flags.DEFINE_string("checkpoint", None, f"Official {family.FAMILY} checkpoint (.pth, "
                      ".safetensors or .npz); with --export, the file to write (.pth or .npz).")
  flags.DEFINE_enum("model", None, family.PRESETS, "Preset the checkpoint is loaded into.")
  flags.DEFINE_string("output", None, "Import: orbax checkpoint directory to write.")
  key = getattr(family, "KEY", "model")
  flags.DEFINE_string("key", key, "Where the state dict is in the checkpoint: "
                      + ("'model' or 'model_ema'." if key == "model" else f"{key!r}."))
  flags.DEFINE_bool("export", False, "Export --input (ours) to --checkpoint instead.")
  flags.DEFINE_string("input", None, "Export: a converter output, a workdir or a step directory.")
  flags.DEFINE_integer("seed", 0, "Import: init seed of params the layout keeps (adaptors).")
  jax.config.update("jax_platforms", "cpu")
  commands.run(lambda argv: _main(family, flags.FLAGS))


def _main(family, f):
  if f.export:
    if not (f.input and f.checkpoint):
      raise app.UsageError("--export needs --input=DIR and --checkpoint=OUT.pth|.npz")
    # --input: a converter output, a training workdir (its newest checkpoint; EMA params when
    # the run kept them) or a step directory: the notebook loader reads all three.
    from adaptor_jax.training import loader  # noqa: PLC0415 - the CLI's only use of it
    model, _ = loader.load_model(f.input)
    if not isinstance(model, family.MODEL_CLASS):
      raise CheckpointMismatch(f"--export: {f.input} holds a {type(model).__name__}, not a "
                               f"{family.FAMILY}")
    family.check_export(model, f.input)
    write_checkpoint(f.checkpoint, family.to_state_dict(model), getattr(family, "KEY", "model"))
    print(f"wrote {f.checkpoint}")
    return
  if not (f.checkpoint and f.model and f.output):
    raise app.UsageError("import needs --checkpoint, --model and --output")
  state_dict = read_checkpoint(f.checkpoint, f.key)
  head = state_dict.get(family.HEAD_BIAS)
  num_classes = 1000 if head is None else int(np.shape(head)[0])
  build = lambda: registry.create_model(f.model, num_classes=num_classes, rngs=nnx.Rngs(f.seed))
  # Only params the layout keeps (adaptors) need initial values; others are built abstractly.
  model = build() if family.needs_init(f.model) else nnx.eval_shape(build)
  family.from_state_dict(model, state_dict)
  save(model, f.model, f.output)
  print(f"wrote {f.output}: {f.model}, {len(state_dict)} tensors, {num_classes} classes")
