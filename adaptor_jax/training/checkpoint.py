"""Orbax checkpoints of a run: the trainer's save, restore and fallback over damaged steps.
(Reading checkpoints outside a run, `load_model` included: loader.py.)

A workdir holds `checkpoints/<step>/` with one item per concern:
  params   the raw params (pure dict, float32)       ema     their EMA (when config.ema_decay)
  opt      {"step", "opt"}: step and optimizer state  data    the grain iterator, one file per process
  config   the run's ConfigDict as JSON               labels  {"names": the classes' names}
  stats    BatchNorm's running statistics (models with BatchNorm only)
Saves are async; the last `config.keep` steps are kept, plus the best by the task's BEST metric
of validation (classification: top1, the EMA's when kept, else raw). Arrays are saved with their shardings and
can be restored onto any devices (loader.py). The workdir may be a bucket (paths.py): orbax
writes arrays through TensorStore and the rest through etils.epath; on several hosts every
process writes its own shards and data iterator state into the one step directory.
"""
import contextlib
import logging as pylogging
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from adaptor_jax import errors, paths
from adaptor_jax.training import tasks

ITEMS = ("params", "ema", "opt", "data", "config", "labels", "stats")


class _Benign(pylogging.Filter):
  """orbax warns that an item has no _CHECKPOINT_METADATA of its own whenever one item of a step
  is read alone (the step's metadata is one level up, as orbax writes it): nothing is wrong, and
  a notebook's load_model would print it each time."""

  def filter(self, record):
    return not record.getMessage().startswith("Metadata file does not exist")


logging.get_absl_logger().addFilter(_Benign())


def manager(workdir, config):
  """The run's CheckpointManager on `workdir`/checkpoints (workdir: a path or URL)."""
  policies = ocp.checkpoint_managers
  best = tasks.get(config.task).BEST
  keep = config.keep
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True, create=True,
      # a step a killed run left unfinished (in a bucket: objects without the commit marker,
      # e.g. an old step half deleted) is removed when the run starts again
      cleanup_tmp_directories=True,
      preservation_policy=policies.AnyPreservationPolicy([
          policies.LatestN(keep),
          policies.BestN(get_metric_fn=lambda metrics: metrics[best], n=1,
                         keep_checkpoints_without_metrics=False),
      ]))
  return ocp.CheckpointManager(paths.resolve(workdir) / "checkpoints", item_names=ITEMS,
                               options=options)


def save(mngr, state, data_iter, config, class_names, metrics=None):
  """Starts an async save of the state at its step (waits for the previous save first)."""
  step = int(jax.device_get(state["step"]))
  items = dict(params=ocp.args.StandardSave(state["params"]),
               opt=ocp.args.StandardSave(dict(step=state["step"], opt=state["opt"])),
               data=grain.checkpoint.CheckpointSave(data_iter),
               config=ocp.args.JsonSave(config.to_dict()),
               labels=ocp.args.JsonSave(dict(names=list(class_names))))
  if state["ema"] is not None:
    items["ema"] = ocp.args.StandardSave(state["ema"])
  if state["stats"]:
    items["stats"] = ocp.args.StandardSave(state["stats"])
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def newest_saved(mngr):
  """The newest step whose save has completed, as storage shows it (None: none yet). Asks none
  of the manager's own state but its list of steps: a save whose finalize waits in a barrier
  for a lost process holds the manager's locks (hosts.py asks this while that happens)."""
  return newest_step(mngr.directory, mngr.all_steps())


def newest_step(directory, steps=None):
  """The newest complete step in a checkpoints `directory` (None: none): a step directory under
  its final name (orbax renames it when the save completes), in a bucket one with orbax's
  commit marker. `steps`: the candidates (default: the integer names in `directory`)."""
  directory = paths.resolve(directory)
  if steps is None:
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
  for step in sorted(steps, reverse=True):
    path = directory / str(step)
    if (path / "commit_success.txt").exists() if paths.is_url(path) else path.is_dir():
      return step
  return None


def restore(mngr, step, abstract_state, shardings, data_iter):
  """The state saved at `step`, placed in `shardings`; `data_iter` continues where it was.
  Raises Damaged naming the item (directory) that cannot be read."""
  items = dict(
      params=ocp.args.StandardRestore(placed(abstract_state["params"], shardings["params"])),
      opt=ocp.args.StandardRestore(placed(dict(step=abstract_state["step"],
                                                opt=abstract_state["opt"]),
                                           dict(step=shardings["step"], opt=shardings["opt"]))))
  if abstract_state["ema"] is not None:
    items["ema"] = ocp.args.StandardRestore(placed(abstract_state["ema"], shardings["ema"]))
  if abstract_state["stats"]:
    items["stats"] = ocp.args.StandardRestore(placed(abstract_state["stats"],
                                                     shardings["stats"]))
  items["data"] = grain.checkpoint.CheckpointRestore(data_iter)  # last: only a readable step
  got = {}                                                      # moves the iterator
  for name, args in items.items():  # one by one, so a failure names its item
    with reading(mngr.directory / str(step) / name):
      got[name] = mngr.restore(step, args=ocp.args.Composite(**{name: args}))[name]
  return dict(step=got["opt"]["step"], params=got["params"], opt=got["opt"]["opt"],
              ema=got.get("ema"), stats=got.get("stats", {}))


def restore_newest(mngr, abstract_state, shardings, data_iter):
  """(state, step) of the newest checkpoint that reads; a damaged one is logged, naming what
  failed, and the one before it tried. Raises Damaged, naming each, when none reads (a run
  never silently restarts from scratch)."""
  failed = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = restore(mngr, step, abstract_state, shardings, data_iter)
    except Damaged as e:
      logging.warning("%s; trying the checkpoint before it", e)
      failed.append((step, str(e)))
      continue
    if failed:  # kept for inspection, out of the way of the steps the run saves again
      _set_aside(mngr, [s for s, _ in failed])
    return state, step
  raise Damaged(f"no checkpoint in {mngr.directory} can be read: "
                + "; ".join(e for _, e in failed))


def _set_aside(mngr, steps):
  """Renames the damaged step directories to <step>.damaged (process 0), so the manager no
  longer lists them and the run can save those steps again."""
  if jax.process_index() == 0:
    for step in steps:
      path = mngr.directory / str(step)
      aside = path.with_name(f"{step}.damaged")
      if aside.exists():
        aside = path.with_name(f"{step}.damaged.{int(time.time())}")
      path.rename(aside)
      logging.warning("moved the damaged checkpoint %s to %s", path, aside)
  if jax.process_count() > 1:  # every process lists the steps after process 0 moved them
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("adaptor_jax: damaged checkpoints set aside")
  mngr.reload()


class Damaged(errors.UserError):
  """A checkpoint (item) that cannot be read; the message names its directory or file."""


@contextlib.contextmanager
def reading(path):
  """Turns a failure to read `path` into Damaged naming it. Orbax raises TensorStore's read
  errors (a missing or truncated chunk file) as a bare Exception, so that is what is caught;
  the message keeps its first line."""
  try:
    yield
  except Exception as e:  # noqa: BLE001 - see the docstring; re-raised as Damaged
    first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
    raise Damaged(f"checkpoint {path} cannot be read ({type(e).__name__}: {first[:300]})") from e


def placed(abstract, shardings):
  """ShapeDtypeStructs of `abstract` carrying `shardings` (what a restore places into)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
