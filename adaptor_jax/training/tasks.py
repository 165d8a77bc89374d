"""The tasks the trainer runs (config.task): one module per task, each giving

  NAME, EVAL_KEYS, BEST              its name, the eval batch's keys, the metric that picks the
                                     best checkpoint (higher is better)
  SHOWN                              ((label, metric), ...) in an evaluation's line
  num_classes(data), class_names(data)
  train_batch_spec(batch_size, image_size) -> {key: (shape, dtype)}   (ahead-of-time compiles)
  train_iterator(data, batch_size=, seed=), eval_iterator(data, batch_size=, split=)
  train_inputs(key, batch, data, num_classes) -> (inputs, targets)     on device, in the step
  loss(outputs, targets) -> scalar                                      of model(inputs)
  eval_counts(model, batch, data) -> {name: summed array}             on device, the model's
                                                                        calls its own
  metrics(counts summed over the split) -> {name: number}

so that the loop, checkpoints, resume, sharding, EMA, remat and the paths stay one trainer.
"""
from adaptor_jax.training import classification, segmentation

TASKS = {classification.NAME: classification, segmentation.NAME: segmentation}


def get(name):
  """The task module of config.task `name`."""
  return TASKS[name]


def line(task, result):
  """An evaluation as a line: each shown metric of the EMA weights (and the raw ones)."""
  def both(k):
    if "ema_" + k not in result:
      return f"{result[k]:.2%}"
    return f"{result['ema_' + k]:.2%} (raw {result['raw_' + k]:.2%})"
  return ", ".join([f"{label} {both(k)}" for label, k in task.SHOWN] + [f"{result['n']} images"])
