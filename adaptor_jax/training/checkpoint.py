"""Orbax checkpoints of a run, and `load_model` for notebooks.

A workdir holds `checkpoints/<step>/` with one item per concern:
  params   the raw params (pure dict, float32)       ema     their EMA (when config.ema_decay)
  opt      {"step", "opt"}: step and optimizer state  data    the grain iterator, one file per process
  config   the run's ConfigDict as JSON
Saves are async; the last `config.keep` steps are kept, plus the best by validation EMA top-1
(top1 in the metrics: EMA's when kept, else raw). Arrays are saved with their shardings and can be restored onto any
devices: `load_model` puts everything on the caller's first device.
"""
import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from adaptor_jax.models import registry
from adaptor_jax.training import config as config_lib

ITEMS = ("params", "ema", "opt", "data", "config")


def best_metric(metrics):
  return metrics["top1"]


def manager(workdir, config=None, read_only=False):
  policies = ocp.checkpoint_managers
  keep = config.keep if config is not None else 1
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True, create=not read_only, read_only=read_only,
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(keep),
          policies.BestN(get_metric_fn=best_metric, n=1, keep_checkpoints_without_metrics=False),
      ]))
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               item_names=ITEMS, options=options)


def save(mngr, state, data_iter, config, metrics=None):
  """Starts an async save of the state at its step (waits for the previous save first)."""
  step = int(jax.device_get(state["step"]))
  items = dict(params=ocp.args.StandardSave(state["params"]),
               opt=ocp.args.StandardSave(dict(step=state["step"], opt=state["opt"])),
               data=grain.checkpoint.CheckpointSave(data_iter),
               config=ocp.args.JsonSave(config.to_dict()))
  if state["ema"] is not None:
    items["ema"] = ocp.args.StandardSave(state["ema"])
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(mngr, step, abstract_state, shardings, data_iter):
  """The state saved at `step`, placed in `shardings`; `data_iter` continues where it was."""
  items = dict(
      params=ocp.args.StandardRestore(_placed(abstract_state["params"], shardings["params"])),
      opt=ocp.args.StandardRestore(_placed(dict(step=abstract_state["step"],
                                                opt=abstract_state["opt"]),
                                           dict(step=shardings["step"], opt=shardings["opt"]))),
      data=grain.checkpoint.CheckpointRestore(data_iter))
  if abstract_state["ema"] is not None:
    items["ema"] = ocp.args.StandardRestore(_placed(abstract_state["ema"], shardings["ema"]))
  got = mngr.restore(step, args=ocp.args.Composite(**items))
  return dict(step=got["opt"]["step"], params=got["params"], opt=got["opt"]["opt"],
              ema=got["ema"] if abstract_state["ema"] is not None else None)


def _find(path):
  """(kind, directory): "workdir" (has checkpoints/), "step" (a step dir of one), or
  "converted" (a converter output: params/ and model.json)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(os.path.join(path, "model.json")):
    return "converted", path
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir", path
  if os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "config")):
    return "step", path
  raise FileNotFoundError(
      f"{path}: not a training workdir (with checkpoints/), a checkpoint step directory (with "
      "params/ and config/), or a converted checkpoint (with model.json)")


def read_config(path):
  """The config of the newest checkpoint in a workdir or of a step directory. Knobs added since
  the run was saved take their defaults (config.default_config)."""
  kind, path = _find(path)
  if kind == "converted":
    raise ValueError(f"{path} is a converted checkpoint; it has model.json, not a run config")
  step_dir = path if kind == "step" else _latest_step_dir(path)
  with open(os.path.join(step_dir, "config", "metadata")) as f:
    saved = json.load(f)
  config = config_lib.default_config()
  config.update(saved)
  return config


def _latest_step_dir(workdir):
  with manager(workdir, read_only=True) as mngr:
    step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint under checkpoints/ yet")
  return os.path.join(workdir, "checkpoints", str(step))


def _placed(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def params_dir(path, ema=True):
  """(directory of the params to load, config) for a workdir (its newest checkpoint), a step
  directory or a converted checkpoint; the EMA item when `ema` and the run kept one."""
  kind, path = _find(path)
  if kind == "converted":
    with open(os.path.join(path, "model.json")) as f:
      return os.path.join(path, "params"), ml_collections.ConfigDict(json.load(f))
  step_dir = path if kind == "step" else _latest_step_dir(path)
  item = "ema" if ema and os.path.isdir(os.path.join(step_dir, "ema")) else "params"
  return os.path.join(step_dir, item), read_config(step_dir)


def load_params(directory, abstract_params, shardings):
  """The params saved in `directory` (an item of ours or a converter's `params`) as a pure dict
  placed in `shardings`; `abstract_params` is the pure-dict structure to expect."""
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(directory).item_metadata
    if converted_layout(saved):  # the converter saved nnx Variables: {"...": {"value": x}}
      target = jax.tree.map(lambda a: {"value": a}, _placed(abstract_params, shardings))
      return jax.tree.map(lambda d: d["value"], ckptr.restore(directory, target),
                          is_leaf=lambda d: isinstance(d, dict) and set(d) == {"value"})
    return ckptr.restore(directory, _placed(abstract_params, shardings))


def converted_layout(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return bool(leaves) and all(str(getattr(p[-1], "key", "")) == "value" for p, _ in leaves)


def load_model(path, *, ema=True, device=None):
  """(model, config) from a workdir, a checkpoint step directory or a converted checkpoint.

  The model is in eval mode with the EMA weights when the run kept them (ema=False: the raw
  ones), on `device` (default: this process's first device), whatever devices and sharding
  the checkpoint was saved from. For a converted checkpoint, config has `model`/`num_classes`.
  """
  from adaptor_jax.training import steps  # noqa: PLC0415 - steps needs the data pipeline
  device = device or jax.local_devices()[0]
  directory, config = params_dir(path, ema)
  if "seed" not in config:  # a converter's model.json
    model = nnx.eval_shape(lambda: registry.create_model(
        config.model, num_classes=config.num_classes, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(model, nnx.Param, ...)
    net = steps.Net(graphdef, steps.placeholders(rest))
  else:
    net, abstract_params, _ = steps.make_net(config, config.num_classes)
  abstract_params = nnx.to_pure_dict(abstract_params)
  single = jax.sharding.SingleDeviceSharding(device)
  params = load_params(directory, abstract_params, jax.tree.map(lambda _: single,
                                                                abstract_params))
  model = nnx.merge(net.graphdef, params, jax.device_put(net.rest, device))
  model.eval()
  return model, config
