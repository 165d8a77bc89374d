"""Checkpoints read outside a run: what a path holds (`find`), its config, its params, and
`load_model` for notebooks, eval.py, init_from and the converter's export.

A path is one of
  workdir    a training workdir (has checkpoints/): its newest checkpoint
  step       a checkpoint step directory (has params/ and config/)
  converted  a converter's output (has model.json and params/, nnx Variables; stats/ too for
             a model with BatchNorm: a converted UperNet)
`find` says which, and which params item to read (the EMA when asked for and kept). A path
may be local or a URL (gs://bucket/run: a notebook or Colab reading a pod's run; paths.py).
"""
import dataclasses
import json

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from adaptor_jax import errors, paths
from adaptor_jax.models import registry
from adaptor_jax.training import checkpoint, config as config_lib, steps


class NotACheckpoint(errors.UserError, FileNotFoundError):
  """The path is not a workdir, a step directory or a converted checkpoint (or has none yet)."""


@dataclasses.dataclass(frozen=True)
class Found:
  """What `find` found at a path."""
  kind: str                  # "workdir", "step" or "converted"
  path: epath.Path           # the path given, absolute
  step_dir: epath.Path | None  # the checkpoint step directory (None: a converted checkpoint)
  params: epath.Path         # the params item to read
  ema: bool                  # whether `params` is the EMA item


def find(path, ema=True, what="path"):
  """Found of `path`; NotACheckpoint when it is none of the three (or a workdir has no step),
  paths.BadPath naming `what` (the flag or key it came from) when it cannot be read at all."""
  path = paths.resolve(path, what)
  paths.check_bucket(path, what)
  if (path / "model.json").exists():
    return Found("converted", path, None, path / "params", False)
  if (path / "checkpoints").is_dir():
    kind, step_dir = "workdir", _latest_step_dir(path)
  elif (path / "params").is_dir() and (path / "config").is_dir():
    kind, step_dir = "step", path
  else:
    raise NotACheckpoint(
        f"{path}: not a training workdir (with checkpoints/), a checkpoint step directory (with "
        "params/ and config/), or a converted checkpoint (with model.json)")
  use_ema = ema and (step_dir / "ema").is_dir()
  return Found(kind, path, step_dir, step_dir / ("ema" if use_ema else "params"), use_ema)


def _latest_step_dir(workdir):
  step = checkpoint.newest_step(workdir / "checkpoints")
  if step is None:
    raise NotACheckpoint(f"{workdir}: no checkpoint under checkpoints/ yet")
  return workdir / "checkpoints" / str(step)


def read_config(found):
  """The run config of a Found (workdir or step); knobs added since the run was saved take their
  defaults (config.default_config). A converted checkpoint's is its model.json."""
  if found.kind == "converted":
    return ml_collections.ConfigDict(json.loads((found.path / "model.json").read_text()))
  path = found.step_dir / "config" / "metadata"
  with checkpoint.reading(path):
    saved = json.loads(path.read_text())
  config = config_lib.default_config()
  config.update(saved)
  return config


def load_stats(found, abstract_stats, sharding):
  """BatchNorm's statistics saved with a checkpoint (a converter's too), placed in `sharding`;
  `abstract_stats` when the model has none ({})."""
  if not abstract_stats:
    return {}
  directory = (found.path if found.kind == "converted" else found.step_dir) / "stats"
  placed = checkpoint.placed(abstract_stats, jax.tree.map(lambda _: sharding, abstract_stats))
  with ocp.StandardCheckpointer() as ckptr, checkpoint.reading(directory):
    return ckptr.restore(directory, placed)


def read_class_names(found):
  """The class names saved with a workdir's or step's checkpoint; None where there are none (a
  converted checkpoint, or a checkpoint saved before they were)."""
  if found.kind == "converted":
    return None
  path = found.step_dir / "labels" / "metadata"
  if not path.exists():
    return None
  with checkpoint.reading(path):
    return json.loads(path.read_text())["names"]


def load_params(directory, abstract_params, shardings):
  """The params saved in `directory` (an item of ours or a converter's `params`) as a pure dict
  placed in `shardings`; `abstract_params` is the pure-dict structure to expect. Damaged names
  the directory when it cannot be read."""
  placed = checkpoint.placed(abstract_params, shardings)
  with ocp.StandardCheckpointer() as ckptr, checkpoint.reading(directory):
    saved = ckptr.metadata(directory).item_metadata
    if converted_layout(saved):  # the converter saved nnx Variables: {"...": {"value": x}}
      target = jax.tree.map(lambda a: {"value": a}, placed)
      return jax.tree.map(lambda d: d["value"], ckptr.restore(directory, target),
                          is_leaf=lambda d: isinstance(d, dict) and set(d) == {"value"})
    return ckptr.restore(directory, placed)


def converted_layout(tree):
  """Whether a params tree (or its metadata) has the converter's {"...": {"value": x}} leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return bool(leaves) and all(str(getattr(p[-1], "key", "")) == "value" for p, _ in leaves)


def load_model(path, *, ema=True, device=None):
  """(model, config) from a workdir, a checkpoint step directory or a converted checkpoint.

  The model is in eval mode with the EMA weights when the run kept them (ema=False: the raw
  ones), on `device` (default: this process's first device), whatever devices and sharding
  the checkpoint was saved from. For a converted checkpoint, config has `model`/`num_classes`.
  """
  device = device or jax.local_devices()[0]
  found = find(path, ema, what="load_model")
  config = read_config(found)
  single = jax.sharding.SingleDeviceSharding(device)
  stats = {}
  if found.kind == "converted":
    model = nnx.eval_shape(lambda: registry.create_model(
        config.model, num_classes=config.num_classes, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, abstract_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat,
                                                                ...)
    net = steps.Net(graphdef, steps.placeholders(rest))
    stats = load_stats(found, nnx.to_pure_dict(abstract_stats), single)
  else:
    net, abstract_params, _ = steps.make_net(config, config.num_classes)
    stats = load_stats(found, steps.initial_stats(config, config.num_classes), single)
  abstract_params = nnx.to_pure_dict(abstract_params)
  params = load_params(found.params, abstract_params,
                       jax.tree.map(lambda _: single, abstract_params))
  model = nnx.merge(net.graphdef, params, stats, jax.device_put(net.rest, device))
  model.eval()
  return model, config
