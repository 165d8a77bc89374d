"""The training loop and evaluation, read top to bottom: train_and_evaluate(config, workdir)."""
import json
import os
import signal
import time

import jax
import ml_collections
from flax import nnx
from absl import logging

from adaptor_jax.data import pipeline
from adaptor_jax.training import (checkpoint, config as config_lib, init_from, optimizer,
                                  sharding, steps)
from adaptor_jax.training.progress import Progress


def setup(config):
  """Checks the config (before any compute), the persistent compile cache, and on several
  hosts jax.distributed. Returns the config with num_classes filled in from the dataset."""
  config_lib.validate(config)
  if config.compile_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compile_cache))
  if config.num_classes == -1:
    config = ml_collections.ConfigDict(config.to_dict())
    config.num_classes = pipeline.num_classes(config.data)
  return config


def _per_process(global_batch):
  if global_batch % jax.process_count():
    raise ValueError(f"batch size {global_batch} is not divisible by the {jax.process_count()} "
                     "processes")
  return global_batch // jax.process_count()


def evaluate(eval_step, params_by_name, config, mesh, split=None):
  """Top-1/top-5 of each named params pytree ("raw", "ema") on `split` (default the eval split):
  {name}_top1, {name}_top5, and top1/top5 of the EMA when given (else raw), n, images_per_s."""
  start = time.time()
  outs = {name: [] for name in params_by_name}  # fetched at the end: loading overlaps compute
  for batch in pipeline.eval_iterator(config.data, split=split,
                                      batch_size=_per_process(config.eval_batch_size)):
    batch = sharding.global_batch({k: batch[k] for k in ("image", "label", "mask")}, mesh)
    for name, params in params_by_name.items():
      outs[name].append(eval_step(params, batch))
  totals = {}
  for name, results in jax.device_get(outs).items():
    totals[name] = {k: sum(int(r[k]) for r in results) for k in ("top1", "top5", "n")}
  seconds = time.time() - start
  result = {}
  for name, t in totals.items():
    result[f"{name}_top1"] = t["top1"] / max(t["n"], 1)
    result[f"{name}_top5"] = t["top5"] / max(t["n"], 1)
  main = "ema" if "ema" in params_by_name else "raw"
  result.update(top1=result[f"{main}_top1"], top5=result[f"{main}_top5"], n=totals[main]["n"])
  result["images_per_s"] = result["n"] * len(params_by_name) / max(seconds, 1e-9)
  return result


class _StopSignal:
  """SIGTERM sets a flag the loop checks every step (single process; on several hosts the
  preemption sync point of jax.distributed decides, so all hosts stop at the same step)."""

  def __init__(self):
    self.stop = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.stop = True

  def __call__(self, mngr, step):
    if jax.process_count() == 1:
      return self.stop
    return mngr.reached_preemption(step)


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns the last
  evaluation's metrics."""
  config = setup(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  n_train = pipeline.num_examples(config.data, config.data.train_split)
  steps_per_epoch = n_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size {config.batch_size} exceeds the {n_train} training "
                     "examples")
  total_steps = round(config.epochs * steps_per_epoch)
  eval_every = round(config.eval_every * steps_per_epoch) or total_steps
  last_step = total_steps if config.max_steps < 0 else min(total_steps, config.max_steps)
  num_classes = config.num_classes
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2)

  made = steps.make_net(config, num_classes)
  counts = steps.param_counts(made[1], made[2])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "params.json"), "w") as f:
      json.dump(counts, f, indent=1)
  tx = optimizer.make(config, steps_per_epoch, trainable=made[2])
  lr_at = optimizer.schedule(config, steps_per_epoch)
  net, state, shardings = steps.create(config, num_classes, mesh, tx, made)
  data_iter = pipeline.train_iterator(config.data, batch_size=_per_process(config.batch_size),
                                      seed=config.seed)
  mngr = checkpoint.manager(workdir, config)
  if mngr.latest_step() is not None:
    state = checkpoint.restore(mngr, mngr.latest_step(), state, shardings, data_iter)
    logging.info("resumed from step %d", mngr.latest_step())
  elif config.init_from:
    state = init_from.apply(state, shardings, config, workdir)
  train_step = steps.make_train_step(net, tx, config, num_classes, shardings, mesh)
  eval_step = steps.make_eval_step(net, config, shardings["params"], mesh)
  step = start = int(jax.device_get(state["step"]))
  progress = Progress(workdir, total_steps=total_steps, batch_size=config.batch_size,
                      start_step=step)
  progress.line(f"{config.model}: {counts['params']:,} params, {counts['trainable']:,} of them "
                f"trained ({counts['trainable_share']:.2%}); {n_train} training images, "
                f"{steps_per_epoch} steps/epoch, {total_steps} steps, mesh {dict(mesh.shape)}, "
                f"from step {step}")
  stop_signal = _StopSignal()
  metrics, result = None, {}
  while step < last_step:
    batch = sharding.global_batch(next(data_iter), mesh)
    state, metrics = train_step(state, batch)
    step += 1
    if step == start + 1:  # rates and ETA count from the end of the first (compiling) step
      jax.block_until_ready(metrics)
      progress.restart(step)
    if step % config.log_every == 0 or step == last_step:
      progress.train(step, jax.device_get(metrics), float(lr_at(step - 1)))
    evaluate_now = step % eval_every == 0 or step == last_step
    if evaluate_now:
      params = {"raw": state["params"]}
      if state["ema"] is not None:
        params["ema"] = state["ema"]
      result = evaluate(eval_step, params, config, mesh)
      progress.scalars(step, result, prefix="eval/")
      progress.line(f"eval at step {step}: " + json.dumps(result))
    stopping = stop_signal(mngr, step)
    if evaluate_now or step % config.checkpoint_every == 0 or stopping:
      checkpoint.save(mngr, state, data_iter, config, metrics=result if evaluate_now else None)
    if stopping:
      progress.line(f"stopping at step {step} on a termination signal; checkpoint saved")
      break
  mngr.wait_until_finished()
  mngr.close()
  progress.close()
  return result


def evaluate_checkpoint(path, config=None, split=None):
  """evaluate() of the newest checkpoint in a workdir (or of a step directory), EMA and raw,
  sharded like training; `config` defaults to the checkpoint's own."""
  config = setup(checkpoint.read_config(path) if config is None else config)
  mesh = sharding.make_mesh(config.mesh)
  net, abstract_params, _ = steps.make_net(config, config.num_classes)
  shardings = steps.param_shardings(abstract_params, mesh)
  abstract_params = nnx.to_pure_dict(abstract_params)
  params = {}
  for name, ema in (("raw", False), ("ema", True)):
    directory, _ = checkpoint.params_dir(path, ema=ema)
    if name == "raw" or os.path.basename(directory) == "ema":
      params[name] = checkpoint.load_params(directory, abstract_params, shardings)
  eval_step = steps.make_eval_step(net, config, shardings, mesh)
  return evaluate(eval_step, params, config, mesh, split)
