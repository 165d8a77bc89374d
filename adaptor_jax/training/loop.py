"""The training loop and evaluation, read top to bottom: train_and_evaluate(config, workdir)."""
import json
import signal
import time

import jax
import ml_collections
from flax import nnx
from absl import logging

from adaptor_jax import errors, paths
from adaptor_jax.data import pipeline
from adaptor_jax.training import (checkpoint, config as config_lib, hosts, init_from, loader,
                                  optimizer, sharding, steps, tasks)
from adaptor_jax.training.progress import Progress


def setup(config):
  """Checks the config (before any compute), the persistent compile cache, and on several
  hosts jax.distributed. Returns the config with num_classes filled in from the dataset."""
  config_lib.validate(config)
  if config.compile_cache:
    jax.config.update("jax_compilation_cache_dir",
                      str(paths.resolve(config.compile_cache, "config.compile_cache")))
  if config.num_classes == -1:
    config = ml_collections.ConfigDict(config.to_dict())
    config.num_classes = tasks.get(config.task).num_classes(config.data)
  return config


def _per_process(global_batch):
  if global_batch % jax.process_count():
    raise ValueError(f"batch size {global_batch} is not divisible by the {jax.process_count()} "
                     "processes")
  return global_batch // jax.process_count()


def evaluate(eval_step, variables_by_name, config, mesh, split=None, stop=None):
  """The task's metrics (classification: top1, top5, n) of each named {"params", "stats"}
  ("raw", "ema") on `split` (default the eval split), as {name}_{metric}, and unprefixed those
  of the EMA when given (else raw), with images_per_s. None when `stop()` turns true between
  batches."""
  task = tasks.get(config.task)
  start = time.time()
  outs = {name: [] for name in variables_by_name}  # fetched at the end: loading overlaps compute
  for batch in task.eval_iterator(config.data, split=split,
                                  batch_size=_per_process(config.eval_batch_size)):
    if stop is not None and stop():
      return None
    batch = sharding.global_batch({k: batch[k] for k in task.EVAL_KEYS}, mesh)
    for name, variables in variables_by_name.items():
      outs[name].append(eval_step(variables, batch))
  seconds = time.time() - start
  result, main = {}, "ema" if "ema" in variables_by_name else "raw"
  for name, counts in jax.device_get(outs).items():
    metrics = task.metrics(jax.tree.map(lambda *c: sum(c), *counts))
    result.update({f"{name}_{k}": v for k, v in metrics.items() if k != "n"})
    if name == main:
      result.update(metrics)
  result["images_per_s"] = result["n"] * len(variables_by_name) / max(seconds, 1e-9)
  return result


class _Terminated(Exception):
  """Raised by the SIGTERM handler inside _StopSignal.interruptible."""


class _StopSignal:
  """SIGTERM sets a flag the loop checks every step (single process; on several hosts the
  preemption sync point of jax.distributed decides, so all hosts stop at the same step).
  A SIGTERM while the loop waits for data (interruptible) gives the wait GRACE_S more seconds:
  a batch that arrives in time is trained on and the run saves as at any step; a wait that is
  still stalled then is cut by _Terminated (nothing saved: the iterator is mid-batch). An
  evaluation checks the flag between batches. So a stall or a long eval ends within seconds."""

  GRACE_S = 3.0

  def __init__(self):
    self.stop, self._waiting = False, False
    self._local = jax.process_count() == 1
    if self._local:
      signal.signal(signal.SIGTERM, self._handle)
      signal.signal(signal.SIGALRM, self._stalled)

  def _handle(self, signum, frame):
    del signum, frame
    self.stop = True
    if self._waiting:
      signal.setitimer(signal.ITIMER_REAL, self.GRACE_S)

  def _stalled(self, signum, frame):
    del signum, frame
    if self._waiting:
      raise _Terminated

  def interruptible(self, fn):
    self._waiting = True
    try:
      if self.stop and self._local:  # the signal came just before this wait
        signal.setitimer(signal.ITIMER_REAL, self.GRACE_S)
      return fn()
    finally:
      self._waiting = False
      if self._local:
        signal.setitimer(signal.ITIMER_REAL, 0)

  def __call__(self, mngr, step):
    if jax.process_count() == 1:
      return self.stop
    return mngr.reached_preemption(step)


class Diverged(errors.UserError):
  """The loss or gradient norm was not finite (more often than config.skip_nonfinite allows)."""


class _FiniteWatch:
  """Checks each step's `finite` metric one step late, so the host never waits for the step it
  has just dispatched; `flush()` checks what is pending (before any log, eval or save, so no
  state after a non-finite step is ever saved). Past config.skip_nonfinite such steps it
  raises Diverged naming the step and the values."""

  def __init__(self, tolerated):
    self.tolerated, self.skipped, self._pending = tolerated, 0, None

  def __call__(self, step, metrics):
    self.flush()
    self._pending = (step, metrics)

  def flush(self):
    if self._pending is None:
      return
    (step, metrics), self._pending = self._pending, None
    m = jax.device_get(metrics)
    if m["finite"]:
      return
    self.skipped += 1
    if self.skipped > self.tolerated:
      tolerated = f" ({self.skipped} such steps; config.skip_nonfinite={self.tolerated})"
      raise Diverged(f"step {step}: loss {float(m['loss'])}, gradient norm "
                     f"{float(m['grad_norm'])}: not finite"
                     f"{tolerated if self.tolerated else ''}; the run stops without saving "
                     "this state; lower config.lr, or let config.skip_nonfinite skip such steps")
    logging.warning("step %d: loss %s, gradient norm %s: not finite; skipped (%d of %d "
                    "tolerated)", step, m["loss"], m["grad_norm"], self.skipped, self.tolerated)


def _newest(mngr):
  step = checkpoint.newest_saved(mngr)
  if step is None:
    return f"no checkpoint in {mngr.directory} yet"
  return f"the newest checkpoint is step {step} in {mngr.directory}"


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns the last
  evaluation's metrics."""
  workdir = paths.resolve(workdir, "--workdir")
  paths.check_bucket(workdir, "--workdir")
  config = setup(config)
  task = tasks.get(config.task)
  mesh = sharding.make_mesh(config.mesh)
  n_train = pipeline.num_examples(config.data, config.data.train_split)
  steps_per_epoch = (n_train // config.batch_size if config.steps_per_epoch < 0
                     else config.steps_per_epoch)
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size {config.batch_size} exceeds the {n_train} training "
                     "examples")
  total_steps = round(config.epochs * steps_per_epoch)
  eval_every = round(config.eval_every * steps_per_epoch) or total_steps
  last_step = total_steps if config.max_steps < 0 else min(total_steps, config.max_steps)
  num_classes = config.num_classes
  class_names = task.class_names(config.data)
  if jax.process_index() == 0:
    paths.write_text(workdir / "config.json", json.dumps(config.to_dict(), indent=2))

  made = steps.make_net(config, num_classes)
  counts = steps.param_counts(made[1], made[2])
  if jax.process_index() == 0:
    paths.write_text(workdir / "params.json", json.dumps(counts, indent=1))
  tx = optimizer.make(config, steps_per_epoch, trainable=made[2])
  lr_at = optimizer.schedule(config, steps_per_epoch)
  net, state, shardings = steps.create(config, num_classes, mesh, tx, made)
  data_iter = task.train_iterator(config.data, batch_size=_per_process(config.batch_size),
                                  seed=config.seed)
  mngr = checkpoint.manager(workdir, config)
  hosts.tell_newest(lambda: _newest(mngr))
  begin = "step 0"
  if mngr.latest_step() is not None:
    state, resumed = checkpoint.restore_newest(mngr, state, shardings, data_iter)
    begin = f"resumed from step {resumed}"
  elif config.init_from:
    state = init_from.apply(state, shardings, config, workdir)
    begin = f"step 0, from {config.init_from} (init_from.json says what was loaded)"
  step = start = int(jax.device_get(state["step"]))
  progress = Progress(workdir, total_steps=total_steps, batch_size=config.batch_size,
                      start_step=step)
  trained = ("all trained" if counts["trainable"] == counts["params"] else
             f"{counts['trainable']:,} of them trained ({counts['trainable_share']:.2%})")
  progress.line(f"{config.model}: {counts['params']:,} params, {trained}; mesh "
                f"{dict(mesh.shape)}; {config.data.name} from "
                f"{pipeline.open_builder(config.data).data_dir}: {n_train} training images, "
                f"{steps_per_epoch} steps/epoch, {total_steps} steps")
  if step >= last_step:
    progress.line(f"workdir {workdir}: complete at step {step} of {last_step}; nothing to train "
                  f"(raise config.max_steps or config.epochs to go on; eval.py evaluates it)")
    mngr.close()
    progress.close()
    data_iter.close()
    return {}
  progress.line(f"workdir {workdir}: {begin}")
  train_step = steps.make_train_step(net, tx, config, num_classes, shardings, mesh)
  eval_step = steps.make_eval_step(net, config, shardings["params"], mesh)
  stop_signal = _StopSignal()
  watch = _FiniteWatch(config.skip_nonfinite)
  result = {}
  try:
    while step < last_step:
      batch = sharding.global_batch(stop_signal.interruptible(lambda: next(data_iter)), mesh)
      state, metrics = train_step(state, batch)
      step += 1
      watch(step, metrics)  # checks the previous step
      if step == start + 1:  # rates and ETA count from the end of the first (compiling) step
        jax.block_until_ready(metrics)
        progress.restart(step)
      if step % config.log_every == 0 or step == last_step:
        watch.flush()
        progress.train(step, dict(jax.device_get(metrics), nonfinite_skipped=watch.skipped,
                                  bad_records=data_iter.failures()["failed"]),
                       float(lr_at(step - 1)))
      evaluate_now = step % eval_every == 0 or step == last_step
      if evaluate_now:
        watch.flush()
        variables = {"raw": dict(params=state["params"], stats=state["stats"])}
        if state["ema"] is not None:  # BatchNorm's statistics are the raw ones
          variables["ema"] = dict(params=state["ema"], stats=state["stats"])
        result = evaluate(eval_step, variables, config, mesh, stop=lambda: stop_signal.stop)
        if result is None:  # stopped by a termination signal: no metrics for this step
          evaluate_now, result = False, {}
        else:
          progress.scalars(step, result, prefix="eval/")
          progress.line(f"eval at step {step}: " + tasks.line(task, result))
      stopping = stop_signal(mngr, step)
      if evaluate_now or step % config.checkpoint_every == 0 or stopping:
        watch.flush()  # never a state after a non-finite step
        checkpoint.save(mngr, state, data_iter, config, class_names,
                        metrics=result if evaluate_now else None)
      if stopping:
        progress.line(f"stopping at step {step} on a termination signal; checkpoint saved")
        break
  except _Terminated:
    progress.line(f"stopping after step {step} on a termination signal: no data came for "
                  f"{_StopSignal.GRACE_S:g} s; not saved (the data iterator was mid-batch); the "
                  f"newest checkpoint is step "
                  f"{mngr.latest_step()}")
  except Diverged as e:
    mngr.wait_until_finished()  # the good saves in flight complete; the keep rule keeps them
    raise Diverged(f"{e}; the newest checkpoint, kept, is step {mngr.latest_step()}") from None
  finally:
    mngr.wait_until_finished()
    mngr.close()
    progress.close()
    data_iter.close()  # its worker processes
  return result


def evaluate_checkpoint(path, config=None, split=None, data=None):
  """evaluate() of the newest checkpoint in a workdir (or of a step directory), EMA and raw,
  sharded like training, or of a converted checkpoint (official weights) with the `config` of
  its task and data; `config` defaults to the checkpoint's own, `data` overrides its data keys
  (eval.py --multiscale). With per-class metrics, "classes" names them."""
  found = loader.find(path, what="--workdir")
  if found.kind == "converted":
    saved = loader.read_config(found)
    if config is None:
      raise loader.NotACheckpoint(
          f"{found.path} is a converted {saved.model}, not a run: give the config of its task "
          "and data (e.g. --config=configs/upernet_ade20k.py:vmamba_tiny), or load it with "
          "load_model")
    if config.model != saved.model:
      raise config_lib.ConfigError(f"config.model: {config.model}, but {found.path} holds a "
                                   f"{saved.model}")
  config = loader.read_config(found) if config is None else config
  if data:
    if config.task != "segmentation":
      raise config_lib.ConfigError(f"{path}: a {config.task} run; multi-scale evaluation is "
                                   "segmentation's")
    config = config.copy_and_resolve_references()
    config.data.update(data)
  config = setup(config)
  mesh = sharding.make_mesh(config.mesh)
  net, abstract_params, _ = steps.make_net(config, config.num_classes)
  shardings = steps.param_shardings(abstract_params, mesh)
  abstract_params = nnx.to_pure_dict(abstract_params)
  raw = loader.find(path, ema=False, what="--workdir").params
  params = {"raw": loader.load_params(raw, abstract_params, shardings)}
  if found.ema:
    params["ema"] = loader.load_params(found.params, abstract_params, shardings)
  for name, tree in params.items():
    bad = [k for k, a in jax.tree_util.tree_flatten_with_path(tree)[0]
           if not bool(jax.numpy.isfinite(a).all())]
    if bad:
      raise checkpoint.Damaged(f"{path}: {len(bad)} of the {name} params are not finite (e.g. "
                               f"{jax.tree_util.keystr(bad[0])}): a diverged run's checkpoint; "
                               "evaluate an earlier step directory")
  stats = loader.load_stats(found, steps.initial_stats(config, config.num_classes),
                            sharding.replicated(mesh))
  eval_step = steps.make_eval_step(net, config, shardings, mesh)
  result = evaluate(eval_step, {name: dict(params=tree, stats=stats)
                                for name, tree in params.items()}, config, mesh, split)
  if any(isinstance(v, list) for v in result.values()):
    result["classes"] = tasks.get(config.task).class_names(config.data)
  return result
