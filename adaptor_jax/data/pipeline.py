"""TFDS ArrayRecord sources and grain pipelines: per-process batches of uint8 images and labels.

  it = train_iterator(config.data, batch_size=b, seed=config.seed)   # infinite, checkpointable
  batch = next(it)   # {"image": uint8 (b, S, S, 3), "label": int32 (b,)}
  for batch in eval_iterator(config.data, batch_size=b): ...        # + "mask": bool (b,)

`batch_size` is per process (the global batch over process_count). Images are decoded and
transformed on the host (transforms.py) in `config.data.num_workers` grain worker processes;
normalisation, random erasing and mixup/cutmix run on device (augment.py).

Train stream. Position p of the global stream is record shuffle_e(p mod n) of epoch e = p // n
(a fresh permutation every epoch, from config.seed); process k of K takes positions k, k+K, ...
(disjoint); a record's augmentation draws from a generator seeded by (seed, epoch, record index).
Batches are built inside the workers, batch j by worker j mod num_workers, so the stream is the
same for any num_workers.

Bad data. A record that cannot be read (its ArrayRecord chunk is corrupt, its file is missing or
truncated) or whose image does not decode is skipped: train drops it (the batch is topped up from
the next one), eval masks it out (mask False). Each row carries a failure code from the workers,
so the main process counts every failure, by split and by shard file, whatever num_workers. It
logs the first few failures one line each (dataset, split, record, file, record in that file,
why), then one summary line every 1000 failures. When more than `max_bad_fraction` of the last
`bad_window` records read failed (config.data; a window of nothing but failures always counts),
the iterator raises `BadDataError` in the main process, one line naming the dataset, split,
files and counts: an all-corrupt dataset stops after a few hundred records instead of spinning.
Nothing else about bad data raises mid-run.

Counts. Both iterators have `failures()`: a fresh dict of this iterator's counts since it was
made (they are not part of its checkpoint state):
  {"dataset": str, "split": str, "seen": records read, "failed": unreadable + undecodable,
   "unreadable": int, "undecodable": int, "by_file": {shard file name: failures}}

Checkpointing. `train_iterator` returns a grain `DatasetIterator`: `get_state()` is a JSON-able
dict and `set_state(state)` continues with exactly the batches (order and augmentation) that
followed. With orbax, save it under the item name "data" next to the train state:

  import grain, orbax.checkpoint as ocp
  mngr = ocp.CheckpointManager(ckpt_dir)
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(train_iter)))
  mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                             data=grain.checkpoint.CheckpointRestore(train_iter)))

`CheckpointSave` writes `train_iter.get_state()` to data/process_<i>-of-<n>.json (i, n =
jax.process_index(), jax.process_count(): every process saves its own); `CheckpointRestore`
calls `set_state` on the iterator you pass, a fresh `train_iterator` built with the same
config, batch_size, seed, process index/count and num_workers (the state records each worker's
position, so num_workers must match), and returns it. The state is captured synchronously
inside `mngr.save`, also with async checkpointing.
"""
import bisect
import collections
import math
import os

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from etils import epath
from google.protobuf import message as proto_message

from adaptor_jax import errors, paths
from adaptor_jax.data import builders, catalog, seg_digits, transforms
from adaptor_jax.data.config import default_data_config  # noqa: F401 - the knobs of `cfg`

_RANDOM_ACCESS_FORMATS = tfds.core.file_adapters.FileFormat.with_random_access()
# What reading one record of a TFDS ArrayRecord source raises when its bytes are bad: the
# array_record reader (C++, pybind11) turns every failed read (chunk or block hash mismatch,
# truncated file, missing file) into RuntimeError; TFDS then parses the record's tf.train.Example
# proto, which raises DecodeError on bytes that are no proto.
_READ_ERRORS = (RuntimeError, proto_message.DecodeError)
OK, _UNREADABLE, UNDECODABLE = 0, 1, 2  # a row's "fail" code
_WARN_FIRST = 5     # failures logged one line each, then
_WARN_EVERY = 1000  # one summary line every this many failures
_FILES_NAMED = 5    # files named in messages, the most failed first


class DatasetMissing(errors.UserError, FileNotFoundError):
  """The dataset, or the data_dir it should be in, is not there; the message says how to
  prepare it."""


class DatasetUnusable(errors.UserError, ValueError):
  """The dataset is there but cannot be read as asked (its file format, a split it lacks)."""


class BadDataError(errors.UserError, RuntimeError):
  """Too many records of a split failed to read or decode (config.data.max_bad_fraction)."""

  def __init__(self, msg, stats=None):
    super().__init__(msg)
    self.stats = stats  # the iterator's failures() when it raised


# ---------------------------------------------------------------------------------------------
# Sources


def _how_to_prepare(name, data_dir):
  where = data_dir or "~/tensorflow_datasets"
  if name == "imagenet2012":
    return (f"Prepare it once: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
            f"{where}/downloads/manual/, then run `tfds build imagenet2012 --data_dir={where} "
            f"--file_format=array_record` (tfds build needs TensorFlow installed in the "
            f"environment that runs it; training does not).")
  if name in catalog.CATALOG_SOURCES:
    download, url, source = catalog.CATALOG_SOURCES[name]
    return (f"Prepare it once: download {download} from {url}, then run `python -m "
            f"adaptor_jax.data.builders --dataset={name} --source={source} --data_dir={where}` "
            f"(no TensorFlow needed).")
  return (f"For your own images run `python -m adaptor_jax.data.builders --dataset=image_folder "
          f"--root=DIR --name={name} --data_dir={where}`; for a TFDS catalog dataset run "
          f"`tfds build {name} --data_dir={where} --file_format=array_record` (needs TensorFlow "
          f"in that environment); the demo dataset `digits` builds itself.")


def open_builder(cfg):
  """The prepared TFDS builder of `cfg.name` in `cfg.data_dir`; `digits` is built if missing.

  Raises DatasetMissing (a FileNotFoundError), saying how to prepare the dataset, when it is
  not there.
  """
  name, data_dir = cfg.name, cfg.data_dir
  if name == builders.DIGITS_NAME:
    return builders.build_digits(data_dir)
  if name == seg_digits.NAME:
    return seg_digits.build(data_dir)
  if data_dir:
    data_dir = str(paths.resolve(data_dir, "config.data.data_dir"))
    paths.check_bucket(data_dir, "config.data.data_dir")
    if not epath.Path(data_dir).is_dir():
      raise DatasetMissing(f"config.data.data_dir={data_dir!r} does not exist. "
                           + _how_to_prepare(name, data_dir))
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    builder = None
  # (builder.is_prepared() would log a warning about the missing folder first)
  if builder is None or not (epath.Path(builder.data_dir) / "dataset_info.json").exists():
    raise DatasetMissing(f"Dataset {name!r} is not prepared in "
                         f"{data_dir or tfds.core.constants.DATA_DIR}. "
                         + _how_to_prepare(name, data_dir))
  file_format = builder.info.file_format
  if file_format is not None and file_format not in _RANDOM_ACCESS_FORMATS:
    raise DatasetUnusable(f"Dataset {name!r} in {builder.data_dir} is stored as "
                          f"{file_format.value}; the pipeline needs random access (array_record). "
                          "Rebuild it with --file_format=array_record.")
  return builder


def open_source(cfg, split):
  """Random-access source of `split`: records {"image": encoded bytes, "label": int, ...}.

  Images (every Image feature: a segmentation's label map too) are not decoded here
  (SkipDecoding): the pipeline's workers decode them.
  """
  builder = open_builder(cfg)
  _split_info(builder, split)
  features = builder.info.features
  decoders = {k: tfds.decode.SkipDecoding() for k in features
              if isinstance(features[k], tfds.features.Image)}
  return builder.as_data_source(split=split, decoders=decoders)


def _split_info(builder, split):
  try:
    return builder.info.splits[split]
  except (KeyError, ValueError) as e:
    raise DatasetUnusable(f"Dataset {builder.name!r} has no split {split!r} (it has "
                          f"{sorted(builder.info.splits)}; slices like 'train[:99%]' work).") from e


def num_examples(cfg, split):
  """Examples in `split` (TFDS split syntax, e.g. "train[:99%]", works)."""
  return _split_info(open_builder(cfg), split).num_examples


def num_classes(cfg):
  """Classes of the dataset's "label" feature."""
  return open_builder(cfg).info.features["label"].num_classes


def class_names(cfg):
  """The names of the dataset's classes, in label order."""
  return list(open_builder(cfg).info.features["label"].names)


# ---------------------------------------------------------------------------------------------
# Per-record work (runs in the grain workers)


def _derived_seed(seed, stream):
  """A 32-bit seed for `stream` (a small int) from any int `seed` (grain shuffles take 32 bits)."""
  return int(np.random.SeedSequence([int(seed) % 2**64, stream]).generate_state(1)[0])


def read_record(source, record_index):
  """(record, OK) or (None, _UNREADABLE) when the source cannot read it."""
  try:
    return source[record_index], OK
  except _READ_ERRORS:
    return None, _UNREADABLE


def _decoded(record):
  """(image, OK) or (None, UNDECODABLE) when the record's bytes are not an image."""
  try:
    return transforms.decode(record["image"]), OK
  except ValueError:
    return None, UNDECODABLE


def read_and_decode(source, record_index):
  """(record or None, image or None, fail code) of one record."""
  record, fail = read_record(source, record_index)
  if fail:
    return None, None, fail
  image, fail = _decoded(record)
  return record, image, fail


class _TrainRecord:
  """(stream position, record index) -> example; augmentation seeded by (seed, epoch, index)."""

  def __init__(self, source, cfg, seed, size):
    self._source, self._cfg, self._seed, self._size = source, cfg, seed, size
    self._blank = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)

  def __call__(self, position, record_index):
    record_index = int(record_index)
    record, image, fail = read_and_decode(self._source, record_index)
    if fail:
      image = self._blank
    else:
      epoch = position // self._size
      rng = np.random.default_rng([int(self._seed) % 2**64, epoch, record_index])
      image = transforms.train_transform(image, rng, self._cfg)
    label = 0 if record is None else record["label"]
    return dict(image=image, label=np.int32(label), index=np.int32(record_index),
                fail=np.int8(fail), real=np.bool_(True))


def padded_share(size, process_count, batch_size):
  """A process's share of `size` records (k, k + K, ...), padded to a multiple of batch_size."""
  return math.ceil(math.ceil(size / process_count) / batch_size) * batch_size


class _EvalRecord:
  """Position j of process k's padded shard -> example (record k + j * K, or padding); its
  len() is the shard's positions."""

  def __init__(self, source, cfg, process_index, process_count, batch_size):
    self._source, self._cfg = source, cfg
    self._process_index, self._process_count = process_index, process_count
    self._size = len(source)
    self._blank = np.zeros((cfg.image_size, cfg.image_size, 3), np.uint8)
    self._positions = padded_share(self._size, process_count, batch_size)

  def __len__(self):
    return self._positions

  def __call__(self, position):
    record_index = self._process_index + position * self._process_count
    if record_index >= self._size:  # padding of the last batch
      return dict(image=self._blank, label=np.int32(0), index=np.int32(-1), fail=np.int8(OK),
                  real=np.bool_(False))
    record, image, fail = read_and_decode(self._source, record_index)
    image = self._blank if fail else transforms.eval_transform(image, self._cfg)
    label = 0 if record is None else record["label"]
    return dict(image=image, label=np.int32(label), index=np.int32(record_index),
                fail=np.int8(fail), real=np.bool_(True))


# ---------------------------------------------------------------------------------------------
# Main-process steps


class _Files:
  """Record index of a split -> (shard file name, record number in that file)."""

  def __init__(self, source):
    instructions = source.dataset_info.splits[source.split].file_instructions
    self.names = [os.path.basename(os.fspath(fi.filename)) for fi in instructions]
    self._skips = [fi.skip for fi in instructions]
    self._starts = [0]
    for fi in instructions[:-1]:
      self._starts.append(self._starts[-1] + fi.take)

  def locate(self, index):
    i = bisect.bisect_right(self._starts, index) - 1
    return self.names[i], self._skips[i] + index - self._starts[i]


def _why(source, index):
  """Why record `index` failed, read again here (the workers only send a code)."""
  try:
    record = source[index]
  except _READ_ERRORS as e:
    return f"cannot be read ({type(e).__name__}: {e})"
  try:
    transforms.decode(record["image"])
  except ValueError as e:
    return f"its image does not decode ({e})"
  return "it failed in a worker but reads and decodes here"


def _check_threshold(cfg):
  """(max_bad_fraction, bad_window) of `cfg`, checked."""
  fraction, window = float(cfg.max_bad_fraction), int(cfg.bad_window)
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"config.data.max_bad_fraction must be in [0, 1], got {fraction}")
  if window < 1:
    raise ValueError(f"config.data.bad_window must be >= 1, got {window}")
  return fraction, window


class _Failures:
  """Counts one split's failed records; logs them (rate-limited); raises BadDataError past the
  threshold (more than max_bad_fraction of the last bad_window records read)."""

  def __init__(self, cfg, split, source):
    self._name, self._split, self._source = cfg.name, split, source
    self._files = _Files(source)
    self._where = source.dataset_info.data_dir
    fraction, window = _check_threshold(cfg)
    self._fraction, self._window = fraction, np.zeros(window, bool)
    self._limit = min(math.floor(fraction * window), window - 1)
    self._pos = self._in_window = 0
    self.seen, self.by_code, self.by_file = 0, collections.Counter(), collections.Counter()
    self._first = None  # "record i (file record j) <why>" of the first failure

  def stats(self):
    """This split's counts (the iterators' failures())."""
    return dict(dataset=self._name, split=self._split, seen=self.seen,
                failed=self.by_code[_UNREADABLE] + self.by_code[UNDECODABLE],
                unreadable=self.by_code[_UNREADABLE], undecodable=self.by_code[UNDECODABLE],
                by_file=dict(self.by_file))

  def add(self, indices, fails):
    """Counts one batch's real rows (record indices, fail codes); warns; raises past the limit."""
    self.seen += len(fails)
    self._slide(fails != OK)
    for index, fail in zip(indices[fails != OK].tolist(), fails[fails != OK].tolist()):
      self.by_code[fail] += 1
      self.by_file[self._files.locate(index)[0]] += 1
      self._warn(index)
    if self._in_window > self._limit:
      stats = self.stats()
      raise BadDataError(self._message(stats), stats)

  def _slide(self, failed):
    """Puts `failed` (bools, in order) into the window of the last bad_window records."""
    failed = failed[-len(self._window):]
    slots = (self._pos + np.arange(len(failed))) % len(self._window)
    self._in_window += int(failed.sum()) - int(self._window[slots].sum())
    self._window[slots] = failed
    self._pos = (self._pos + len(failed)) % len(self._window)

  def _record(self, index):
    file_name, position = self._files.locate(index)
    return f"record {index} ({file_name} record {position})"

  def _counts(self, stats):
    named = ", ".join(f"{f}: {n}" for f, n in self.by_file.most_common(_FILES_NAMED))
    more = len(self.by_file) - _FILES_NAMED
    named += f" and {more} more files" if more > 0 else ""
    return (f"{stats['failed']} failed of {stats['seen']} read ({stats['unreadable']} unreadable, "
            f"{stats['undecodable']} undecodable; by file: {named}; files in {self._where})")

  def _warn(self, index):
    failed = sum(self.by_code.values())
    if failed <= _WARN_FIRST:
      line = f"{self._record(index)}: {_why(self._source, index)}"
      self._first = self._first or line
      logging.warning("%s split %r: skipping %s (%d failed of %d read so far%s).", self._name,
                      self._split, line, failed, self.seen,
                      "; next, one summary every %d failures" % _WARN_EVERY
                      if failed == _WARN_FIRST else "")
    elif failed % _WARN_EVERY == 0:
      logging.warning("%s split %r: %s so far.", self._name, self._split,
                      self._counts(self.stats()))

  def _message(self, stats):
    return (f"{self._name} split {self._split!r}: {self._in_window} of the last "
            f"{min(stats['seen'], len(self._window))} records read failed, more than "
            f"config.data.max_bad_fraction={self._fraction:g} of bad_window="
            f"{len(self._window)}; {self._counts(stats)}; first: {self._first}; fix or rebuild "
            f"the dataset, or raise max_bad_fraction")


class _DropCorrupt:
  """Drops (train) or masks out (eval) rows that failed to read or decode; counts them."""

  def __init__(self, failures, with_index, keep_rows):
    self._failures, self._with_index, self._keep_rows = failures, with_index, keep_rows

  def __call__(self, batch):
    real = batch["real"]
    self._failures.add(batch["index"][real], batch["fail"][real])
    corrupt = real & (batch["fail"] != OK)
    out = {k: v for k, v in batch.items() if k not in ("index", "fail", "real")}
    if self._with_index:
      out["index"] = batch["index"]
    if self._keep_rows:
      out["mask"] = real & ~corrupt
    elif corrupt.any():
      out = {k: v[~corrupt] for k, v in out.items()}
    return out


class _Iterator(grain.DatasetIterator):
  """grain's iterator of the pipeline plus failures(): this split's counts (see module doc)."""

  def __init__(self, parent, failures):
    super().__init__(parent)
    self._failures = failures

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)

  def failures(self):
    """{"dataset", "split", "seen", "failed", "unreadable", "undecodable", "by_file"}."""
    return self._failures.stats()


def _to_iter(ds, cfg, max_workers=None):
  """MapDataset of batches -> IterDataset produced by cfg.num_workers processes (0 = here)."""
  num_workers, prefetch = int(cfg.num_workers), max(1, int(cfg.prefetch))
  if num_workers < 0:
    raise ValueError(f"config.data.num_workers must be >= 0, got {num_workers}")
  if max_workers is not None:
    num_workers = min(num_workers, max_workers)
  # Each element is a whole batch: one thread per process computes it; processes give the
  # parallelism (the transforms hold the GIL for part of their work).
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if num_workers:
    if not flags.FLAGS.is_parsed():  # grain reads absl flags when it starts workers; outside an
      flags.FLAGS.mark_as_parsed()   # absl app (tests, notebooks) they keep their defaults
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=prefetch))
  return ds


def _process(process_index, process_count):
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
  return process_index, process_count


def _check_batch_size(batch_size):
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int (per process), got {batch_size!r}")
  return int(batch_size)


def train_iterator(cfg, *, batch_size, seed, process_index=None, process_count=None,
                   with_index=False, record=None):
  """Infinite, checkpointable iterator of this process's training batches (see module doc).

  Yields {"image": uint8 (batch_size, S, S, 3), "label": int32 (batch_size,)}, plus "index"
  (int32 record indices) when `with_index`. process_index / process_count default to JAX's.
  Failed records are dropped and counted (`failures()`); BadDataError past the threshold.
  record: what makes an example of a record, record(source, cfg, seed, size)(position,
  index) -> its arrays with "index", "fail" and "real" (default: classification's; another
  task's gives its own arrays, e.g. segmentation's label maps).
  """
  batch_size = _check_batch_size(batch_size)
  process_index, process_count = _process(process_index, process_count)
  source = open_source(cfg, cfg.train_split)
  size = len(source)
  if size == 0:
    raise ValueError(f"Split {cfg.train_split!r} of {cfg.name!r} is empty.")
  ds = grain.MapDataset.range(size).shuffle(seed=_derived_seed(seed, 0)).repeat()
  ds = ds.map_with_index((record or _TrainRecord)(source, cfg, seed, size))
  ds = ds[process_index::process_count].batch(batch_size, drop_remainder=True)
  ds = _to_iter(ds, cfg)
  failures = _Failures(cfg, cfg.train_split, source)
  ds = ds.map(_DropCorrupt(failures, with_index, keep_rows=False))  # raises past the threshold
  ds = ds.filter(lambda batch: len(batch["label"]) > 0)  # every row was corrupt
  ds = grain.experimental.RebatchIterDataset(ds, batch_size, drop_remainder=True)
  return _Iterator(iter(ds), failures)


def num_eval_batches(cfg, *, batch_size, split=None, process_count=None, record=None):
  """Batches every process's `eval_iterator` yields."""
  _, process_count = _process(0, process_count)
  split = cfg.eval_split if split is None else split
  batch_size = _check_batch_size(batch_size)
  make = (record or _EvalRecord)(open_source(cfg, split), cfg, 0, process_count, batch_size)
  return len(make) // batch_size


def eval_iterator(cfg, *, batch_size, split=None, process_index=None, process_count=None,
                  with_index=False, record=None):
  """Finite iterator over this process's share of `split` (default cfg.eval_split), in order.

  Yields {"image": uint8 (batch_size, S, S, 3), "label": int32, "mask": bool} (+ "index" when
  `with_index`, -1 on padding). Process k of K gets records k, k+K, ...; every process yields
  the same number of batches (num_eval_batches), the last ones padded (mask False), so each
  record is seen exactly once over all processes. A record that cannot be read or does not
  decode is masked out and counted (`failures()`); BadDataError past the threshold.
  record: as train_iterator's, record(source, cfg, process_index, process_count,
  batch_size)(position); its len(), the positions, a multiple of batch_size, the same on every
  process.
  """
  batch_size = _check_batch_size(batch_size)
  process_index, process_count = _process(process_index, process_count)
  split = cfg.eval_split if split is None else split
  source = open_source(cfg, split)
  make = (record or _EvalRecord)(source, cfg, process_index, process_count, batch_size)
  ds = grain.MapDataset.range(len(make)).map(make)
  # No more workers than batches: each would start (seconds) for nothing.
  ds = _to_iter(ds.batch(batch_size), cfg, max_workers=len(make) // batch_size)
  failures = _Failures(cfg, split, source)
  ds = ds.map(_DropCorrupt(failures, with_index, keep_rows=True))
  return _Iterator(iter(ds), failures)
