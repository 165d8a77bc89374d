"""The TFDS ArrayRecord writer every dataset of ours is built with (builders.py's digits and
image folders, catalog.py's cifar100, svhn_cropped and food101, ade20k.py, seg_digits.py),
without TensorFlow: a generic TFDS builder that writes the examples it is given, one build at
a time per data_dir (a file lock), staged locally for a bucket, and the helpers the builders
share (PNG encoding, the decode check and its one-line list of bad files, the errors).

It is its own module so the dataset modules and the command line (builders.py, which lists the
catalog's datasets) all import it and not each other.
"""
import contextlib
import fcntl
import io
import os
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from adaptor_jax import errors, paths
from adaptor_jax.data import transforms

DEFAULT_VERSION = "1.0.0"  # of digits and image folders
_BAD_NAMED = 5  # bad files named in a message
# dataset_info.json's moduleName: the command line that builds them (a class made by type() is
# importable from no module; without a name TFDS would write abc's).
_MODULE = "adaptor_jax.data.builders"


class SourceMissing(errors.UserError, FileNotFoundError):
  """A file or directory to build a dataset from is not there."""


class BuildError(errors.UserError, ValueError):
  """What to build from, or how, is not what a builder can take (the message names it)."""


def image_features(class_names):
  """The features of `digits` and image folders."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(names=list(class_names)),
      "file_name": tfds.features.Text(),
  })


def file_examples(rows):
  """(key, example) of rows (file_name, label, encoded bytes or a path), keyed by file_name."""
  for file_name, label, data in rows:
    if not isinstance(data, bytes):
      with open(data, "rb") as f:
        data = f.read()
    yield file_name, {"image": data, "label": label, "file_name": file_name}


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes `self._examples`, {split: iterable of (key, example)}, with `self._features`."""

  VERSION = tfds.core.Version(DEFAULT_VERSION)
  RELEASE_NOTES = {DEFAULT_VERSION: "First version."}
  # No checksums or metadata files next to the code: set both so TFDS doesn't look for them
  # (that lookup needs `importlib_resources` and fails for a builder defined in `__main__`).
  code_path = None
  pkg_dir_path = epath.Path(os.path.dirname(os.path.abspath(__file__)))

  def __init__(self, *, features, examples=None, description="", metadata=None, **kwargs):
    self._features = features
    self._examples = examples or {}
    self._description = description
    self._metadata = metadata
    super().__init__(**kwargs)

  def _info(self):
    supervised = ("image", "label") if "label" in self._features else None
    return self.dataset_info_from_configs(
        description=self._description, features=self._features, supervised_keys=supervised,
        metadata=tfds.core.MetadataDict(self._metadata) if self._metadata else None)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(rows) for split, rows in self._examples.items()}

  def _generate_examples(self, rows):
    yield from rows

  def _log_download_bytes(self):
    """TFDS prints 'Downloading and preparing dataset Unknown size ...': nothing is downloaded
    here, and build_once says what was built where."""

  def _log_download_done(self):
    """(See _log_download_bytes.)"""


def _builder_class(name, version=DEFAULT_VERSION):
  """A `_Builder` subclass named `name` (the TFDS name comes from the class attribute)."""
  version = str(version)
  attrs = {"name": name, "__module__": _MODULE}
  if version != DEFAULT_VERSION:  # a catalog dataset's version
    attrs.update(VERSION=tfds.core.Version(version),
                 RELEASE_NOTES={version: "Built by adaptor_jax.data.builders."})
  return type(f"Builder_{name}", (_Builder,), attrs, skip_registration=True)


@contextlib.contextmanager
def _lock(name, data_dir):
  """An exclusive file lock so concurrent processes don't build the same dataset twice. None for
  a URL data_dir: processes that race there build the same files locally and copy them."""
  if paths.is_url(data_dir):
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _staged(name, data_dir, version):
  """Yields the local data_dir to write `name`/`version` in: data_dir itself, or for a URL a
  local temporary one whose version directory is then copied into the bucket (replacing what
  is there), dataset_info.json last: a reader never takes a partial copy for a dataset."""
  if not paths.is_url(data_dir):
    yield data_dir
    return
  with tempfile.TemporaryDirectory(prefix="adaptor_jax-build-") as local:
    yield local
    built, dest = epath.Path(_version_dir(name, local, version)), _version_dir(name, data_dir,
                                                                                version)
    if dest.exists():
      dest.rmtree()
    for f in sorted(built.iterdir(), key=lambda f: f.name == "dataset_info.json"):
      with f.open("rb") as src, (dest / f.name).open("wb") as out:
        shutil.copyfileobj(src, out, 16 << 20)
    logging.info("Copied %s/%s into %s", name, version, dest)


def _prepare(builder):
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def write(name, data_dir, features, examples, description, version=DEFAULT_VERSION,
          metadata=None):
  """Writes `examples` ({split: iterable of (key, example)}) as `name`/`version` in the local
  data_dir, with `metadata` (a dict, e.g. a segmentation dataset's class names). Files of that
  version already there are removed first (else TFDS would reuse them)."""
  if os.path.isdir(_version_dir(name, data_dir, version)):
    shutil.rmtree(_version_dir(name, data_dir, version))
  return _prepare(_builder_class(name, version)(
      data_dir=data_dir, file_format="array_record", features=features, examples=examples,
      description=description, metadata=metadata))


def _version_dir(name, data_dir, version=DEFAULT_VERSION):
  return paths.resolve(data_dir, "--data_dir") / name / str(version)


def _is_prepared(name, data_dir, version=DEFAULT_VERSION):
  return (_version_dir(name, data_dir, version) / "dataset_info.json").exists()


def data_dir_of(data_dir):
  """`data_dir` (a path or URL; "" or None: TFDS' default) as a string TFDS takes."""
  return str(paths.resolve(data_dir or tfds.core.constants.DATA_DIR, "--data_dir"))


def build_once(name, version, data_dir, overwrite, write, *args):
  """Under the lock, calls `write(local_data_dir, *args)` unless `name`/`version` is prepared in
  data_dir (or `overwrite`); for a URL data_dir it writes locally and copies the result there.
  Returns a read-only builder of the prepared dataset."""
  data_dir = data_dir_of(data_dir)
  paths.check_bucket(data_dir, "--data_dir")
  with _lock(name, data_dir):
    if overwrite or not _is_prepared(name, data_dir, version):
      with _staged(name, data_dir, version) as local:
        write(local, *args)
      built = tfds.builder_from_directory(os.fspath(_version_dir(name, data_dir, version)))
      splits = ", ".join(f"{s} {i.num_examples}" for s, i in built.info.splits.items())
      print(f"built the dataset {name} {version} in {built.data_dir} ({splits})", flush=True)
      return built
    logging.info("Reusing %s in %s", name, data_dir)
  return tfds.builder_from_directory(os.fspath(_version_dir(name, data_dir, version)))


def png(rgb_u8):
  """PNG bytes of an (H, W, 3) uint8 array (lossless: it decodes to the same pixels)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(rgb_u8)).save(buf, format="PNG")
  return buf.getvalue()


def decode_error(data):
  """None when `data` decodes as the pipeline decodes it, else the reason."""
  try:
    transforms.decode(data)
  except ValueError as e:
    return str(e)
  return None


def bad_list(bad):
  """"a (why), b, c ... and N more" of [(name, why)]: the first reason, the first names."""
  named = [f"{bad[0][0]} ({bad[0][1]})"] + [n for n, _ in bad[1:_BAD_NAMED]]
  more = len(bad) - _BAD_NAMED
  return ", ".join(named) + (f" and {more} more" if more > 0 else "")
