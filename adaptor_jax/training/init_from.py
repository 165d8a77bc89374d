"""`config.init_from`: a run starts from another run's or a converter's params, strictly.

The checkpoint (a workdir: its newest checkpoint, EMA params when kept; a step directory; or
a converter's output) is matched to the model param by param, by path:
  loaded        same path and shape: restored; the EMA starts from them too;
  kept at init  only what the model initialises by design: the adaptors (Adaptor-T/S) of the
                booster and adaptor forms when the checkpoint has none, and the head when the
                checkpoint's has another shape (another number of classes).
A dense model (UperNet) may also start from a classifier of its backbone (an ImageNet run, a
converted VMamba): the classifier's params are matched under the model's backbone prefix, its
classifier head is left out (listed as dropped) and the model's own heads keep their init
(registry.from_classifier).
Anything else stops the run before any training, in one line naming the params: one the
checkpoint lacks, one of another shape, or one of the checkpoint the model has no place for
(its values would be lost). Only the params to load are read (orbax partial restore).
BatchNorm's running statistics come along when the checkpoint has them for the same model
(a run or a converted UperNet; from a classifier they start at their init).
The run's workdir gets init_from.json: where from, what was loaded, what kept its init.
"""
import json

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from adaptor_jax import errors, paths
from adaptor_jax.models import registry
from adaptor_jax.training import checkpoint, loader

ADAPTORS = ("adaptor_t", "adaptor_s")   # path parts of the adaptors' params
FORMS_WITH_NEW_ADAPTORS = ("booster", "adaptor")
HEAD = "head"                           # the classifier's Linear (head_norm is loaded)


class InitFromError(errors.UserError, ValueError):
  """config.init_from's checkpoint does not fit the model (the message names the params)."""


def _raw(entry):
  return getattr(entry, "key", getattr(entry, "idx", entry))


def _key(entry):
  return str(_raw(entry))


def _flat(tree):
  """{"a/b/0/c": leaf} of a pytree."""
  return {"/".join(map(_key, path)): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def model_form(config):
  """The form of config's model (of its backbone for UperNet): config.form, else the preset's
  ("none" for Vim)."""
  backbone = registry.UPERNET_PRESETS.get(config.model, config.model)
  return config.form or registry.VMAMBA_PRESETS.get(backbone, {}).get("form", "none")


def saved_shapes(directory):
  """({param path: shape} of a params item, whether it has the converter's layout)."""
  with ocp.StandardCheckpointer() as ckptr:
    metadata = ckptr.metadata(directory).item_metadata
  converted = loader.converted_layout(metadata)
  flat = _flat(metadata)
  if converted:  # nnx Variables: {"...": {"value": x}}
    flat = {path[:-len("/value")]: leaf for path, leaf in flat.items()}
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}, converted


def plan(saved, wanted, form, new_parts=()):
  """(paths to load, paths kept at init) of the model's params `wanted` ({path: shape}) from
  a checkpoint's `saved` ({path: shape}); params under `new_parts` (first path parts) start at
  init. Raises ValueError naming what does not fit."""
  new_adaptors = form in FORMS_WITH_NEW_ADAPTORS
  load, init, absent, shaped = [], [], [], []
  for path, shape in wanted.items():
    parts = path.split("/")
    if path in saved and saved[path] == shape:
      load.append(path)
    elif path in saved:
      (init if parts[0] == HEAD else shaped).append(path)
    elif parts[0] in new_parts or (new_adaptors and any(a in parts for a in ADAPTORS)):
      init.append(path)
    else:
      absent.append(path)
  unplaced = sorted(set(saved) - set(wanted))
  problems = []
  if absent:
    hint = ""
    if form == "backbone" and any(a in p.split("/") for p in absent for a in ADAPTORS):
      hint = " (form=booster inserts adaptors that start at zero)"
    problems.append(f"absent from the checkpoint: {_some(absent)}{hint}")
  if shaped:
    problems.append("of another shape: " + _some(
        [f"{p} {saved[p]} vs the model's {wanted[p]}" for p in shaped]))
  if unplaced:
    problems.append(f"in the checkpoint with no place in the model: {_some(unplaced)}")
  if problems:
    raise ValueError("; ".join(problems))
  return load, init


def _from_classifier(model, saved):
  """(backbone prefix, the checkpoint's params left out, the model's parts new at init) when
  `model` is dense and the checkpoint (`saved` paths) a classifier; else (None, [], ())."""
  mapping = registry.from_classifier(model)
  if mapping is None or any(p.split("/")[0] == mapping[0] for p in saved):
    return None, [], ()
  prefix, classifier, new_parts = mapping
  return prefix, sorted(p for p in saved if p.split("/")[0] in classifier), new_parts


def _some(items, n=4):
  more = f" ... ({len(items)} in all)" if len(items) > n else ""
  return ", ".join(items[:n]) + more


def _subtree(tree, keep):
  """The nested dicts of `tree` holding only the leaves whose path is in `keep`."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if "/".join(map(_key, path)) in keep:
      node = out
      for entry in path[:-1]:
        node = node.setdefault(_raw(entry), {})
      node[_raw(path[-1])] = leaf
  return out


def restore(directory, wanted, abstract_params, shardings, converted):
  """{path: array} of the param paths `wanted` read from the params item `directory`, placed in
  `shardings`."""
  target = _subtree(checkpoint.placed(abstract_params, shardings), set(wanted))
  if converted:
    target = jax.tree.map(lambda a: {"value": a}, target)
  with ocp.PyTreeCheckpointer() as ckptr:
    got = ckptr.restore(directory, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  flat = _flat(got)
  return {path[:-len("/value")] if converted else path: a for path, a in flat.items()}


def apply(state, shardings, config, workdir):
  """The fresh train `state` with config.init_from's params in (EMA too); InitFromError. The
  report goes to `workdir`/init_from.json (a path or URL)."""
  workdir = paths.resolve(workdir)
  try:
    found = loader.find(config.init_from, what="config.init_from")
  except loader.NotACheckpoint as e:
    raise InitFromError(f"config.init_from: {e}") from None
  directory = found.params
  saved, converted = saved_shapes(directory)
  wanted = {path: tuple(a.shape) for path, a in _flat(state["params"]).items()}
  prefix, dropped, new_parts = _from_classifier(config.model, saved)
  if prefix:
    saved = {f"{prefix}/{p}": s for p, s in saved.items() if p not in dropped}
  try:
    load, init = plan(saved, wanted, model_form(config), new_parts)
  except ValueError as e:
    raise InitFromError(f"config.init_from={config.init_from}: {config.model} "
                     f"(form {model_form(config)}) cannot start from {directory}: {e}") from None
  if prefix:  # read under the checkpoint's own names, then placed under the prefix
    n = len(prefix) + 1
    values = {f"{prefix}/{p}": a for p, a in restore(
        directory, [p[n:] for p in load], state["params"][prefix], shardings["params"][prefix],
        converted).items()}
  else:
    values = restore(directory, load, state["params"], shardings["params"], converted)
  params = jax.tree_util.tree_map_with_path(
      lambda path, old: values[k].astype(old.dtype) if (k := "/".join(map(_key, path))) in values
      else old, state["params"])
  ema = jax.tree.map(jnp.copy, params) if state["ema"] is not None else None
  stats, stats_from = state["stats"], "init"
  if stats and not prefix and _has_stats(found):  # the same model's BatchNorm: its statistics
    stats_from = str(found.step_dir or found.path)
    stats = loader.load_stats(found, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), stats),
        jax.tree.leaves(shardings["stats"])[0])  # replicated, as all of them
  logging.info("init_from %s: %d params loaded, %d kept at init: %s", directory, len(load),
               len(init), init)
  if jax.process_index() == 0:
    paths.write_text(workdir / "init_from.json", json.dumps(dict(
        init_from=config.init_from, directory=str(directory), loaded=len(load),
        kept_at_init=init, dropped=dropped, batch_stats=stats_from), indent=1))
  return dict(state, params=params, ema=ema, stats=stats)


def _has_stats(found):
  return ((found.step_dir or found.path) / "stats").is_dir()
