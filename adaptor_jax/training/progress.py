"""What a run reports: a progress line on stdout, TensorBoard event files in `workdir/tensorboard`
and every logged value, full precision, as JSON lines in `workdir/metrics.jsonl`. The workdir may
be a bucket (paths.py): both files are then rewritten whole at every flush."""
import datetime
import json
import time

import jax
from absl import logging

from adaptor_jax import paths


class _EventFiles:
  """tensorboardX's writer factory for URL workdirs: the event file through paths.Appender (its
  own GCS writer takes another client and knows gs:// only)."""

  def open(self, path):
    return paths.Appender(path, binary=True)

  def directory_check(self, path):
    del path  # an object store has no directories to make


class Progress:
  """Progress lines every `log_every` steps: step, loss, lr, images/s (total and per device), ETA.
  Only process 0 writes (stdout and `workdir/tensorboard`)."""

  def __init__(self, workdir, *, total_steps, batch_size, start_step):
    self.total, self.batch = total_steps, batch_size
    workdir = paths.resolve(workdir)
    self.lead = jax.process_index() == 0
    self.writer = self.jsonl = None
    if self.lead:
      from tensorboardX import SummaryWriter, record_writer  # noqa: PLC0415 - process 0 only
      for scheme in paths.SCHEMES:
        record_writer.register_writer_factory(scheme, _EventFiles())
      self.writer = SummaryWriter(str(workdir / "tensorboard"))
      self.jsonl = paths.Appender(workdir / "metrics.jsonl")
    self._t, self._step = time.time(), start_step

  def restart(self, step):
    """Rates count from here (call it once the first step, with its compilation, is done)."""
    self._t, self._step = time.time(), step

  def train(self, step, metrics, lr):
    """Called with host values after `step` steps."""
    now = time.time()
    if step == self._step:  # nothing timed yet: the first step (its compilation) just ended
      rate, eta = float("nan"), "?"
    else:
      rate = (step - self._step) * self.batch / max(now - self._t, 1e-9)
      eta = datetime.timedelta(seconds=round((self.total - step) * self.batch / rate))
    self._t, self._step = now, step
    line = (f"step {step}/{self.total} | loss {metrics['loss']:.4f} | lr {lr:.3e} | "
            f"{rate:.1f} img/s | {rate / jax.device_count():.1f} img/s/device | ETA {eta}")
    if metrics.get("bad_records"):  # skipped by the input pipeline (pipeline.failures())
      line += f" | {metrics['bad_records']} bad records skipped"
    if metrics.get("nonfinite_skipped"):
      line += f" | {metrics['nonfinite_skipped']} non-finite steps skipped"
    rates = {} if rate != rate else dict(images_per_s=rate)  # none yet: the first step compiles
    self.scalars(step, dict(metrics, lr=lr, **rates), prefix="train/")
    self.line(line)

  def scalars(self, step, values, prefix=""):
    """Numbers to TensorBoard and metrics.jsonl; lists (per-class values) to metrics.jsonl."""
    if self.writer is not None:
      values = {prefix + k: v if isinstance(v, list) else float(v) for k, v in values.items()}
      for k, v in values.items():
        if not isinstance(v, list):
          self.writer.add_scalar(k, v, step)
      self.writer.flush()
      self.jsonl.write(json.dumps(dict(step=step, **values)) + "\n")
      self.jsonl.flush()

  def line(self, text):
    if self.lead:
      print(text, flush=True)
    logging.info(text)

  def close(self):
    if self.writer is not None:
      self.writer.close()
      self.jsonl.close()
