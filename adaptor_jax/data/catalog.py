r"""TFDS catalog datasets, built from the files their sites distribute (downloaded by the user;
nothing is downloaded here) with the catalog builder's name, version, splits, features, label
indices, class names and example keys, so TFDS' own registered builder reads them
(`tfds.builder(name, data_dir=...)`) and its shuffle-by-key gives the same record order:
- `cifar100` 3.0.2 from the python version, cifar-100-python.tar.gz (train 50000, test 10000):
  id "train_00000", image (32, 32, 3) PNG, label (100 fine), coarse_label (20), names from the
  archive's meta; keys are the indices in file order.
- `svhn_cropped` 3.1.0 from train_32x32.mat, test_32x32.mat and, if present, extra_32x32.mat:
  image (32, 32, 3) PNG, label y % 10 (10 is digit 0), id "train_000000"; keys are indices.
- `food101` 2.0.0 from food-101.tar.gz: image (the original JPEG bytes), label (TFDS' 101 names);
  splits train (meta/train.txt) and validation (meta/test.txt); keys are the image names
  ("apple_pie/1005649"). The archive is read in place, one image at a time; each JPEG is decoded
  as it is written, and the build fails (nothing is kept) listing the members that don't decode.

Each is written by writer.py (the TFDS ArrayRecord writer, one build at a time per data_dir);
`python -m adaptor_jax.data.builders --dataset=NAME --source=...` builds it.
"""
import io
import os
import pickle
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from adaptor_jax.data import ade20k, writer
from adaptor_jax.data.writer import BuildError, SourceMissing


CIFAR100_NAME, CIFAR100_VERSION = "cifar100", "3.0.2"
SVHN_NAME, SVHN_VERSION = "svhn_cropped", "3.1.0"
FOOD101_NAME, FOOD101_VERSION = "food101", "2.0.0"
# {name: (what to download, from where, the --source to pass)}, for messages.
CATALOG_SOURCES = {
    CIFAR100_NAME: ("cifar-100-python.tar.gz (the python version)",
                    "https://www.cs.toronto.edu/~kriz/cifar.html",
                    "PATH/cifar-100-python.tar.gz"),
    SVHN_NAME: ("train_32x32.mat and test_32x32.mat (optionally extra_32x32.mat) into one "
                "directory DIR", "http://ufldl.stanford.edu/housenumbers/", "DIR"),
    FOOD101_NAME: ("food-101.tar.gz", "https://data.vision.ee.ethz.ch/cvl/food-101.tar.gz",
                   "PATH/food-101.tar.gz"),
}
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
_FOOD101_NAMES_FILE = "image_classification/food-101_classes.txt"  # in TFDS' package


def _open_tar(path, what):
  """The tar archive `path` opened for reading; one-line errors when it is missing or bad."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.isfile(path):
    raise SourceMissing(f"{what} archive {path!r} does not exist.")
  try:
    return tarfile.open(path, "r:*")
  except (tarfile.TarError, OSError, EOFError) as e:
    raise BuildError(f"{path}: not a readable tar archive ({e}).") from None


def _members(tar):
  """{name without a leading "./": TarInfo} of the archive's files (reads through it once)."""
  return {m.name[2:] if m.name.startswith("./") else m.name: m for m in tar.getmembers()
          if m.isfile()}


def _read_member(tar, members, name):
  """The bytes of archive member `name`; FileNotFoundError naming the archive if it's absent."""
  if name not in members:
    raise SourceMissing(f"{tar.name}: no member {name!r}.")
  return tar.extractfile(members[name]).read()


# cifar100


class _ArraysOnly(pickle.Unpickler):
  """An unpickler for CIFAR's pickles: dicts, lists, strings, numbers and numpy arrays, nothing
  else. A pickle names any other callable only to call it (os.system, say): refused before
  anything runs, where pickle.loads would have run it."""

  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype"),
             ("_codecs", "encode")}  # bytes pickled by Python 3 at protocol 2 (str -> latin-1)

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"it calls {module}.{name}, which CIFAR's pickles never do: "
                                 "refused, nothing was run")


def _cifar100_pickle(tar, members, name, keys):
  """The dict in pickle `name` of the archive, with str keys; checks that `keys` are there."""
  try:  # the archive's pickles come from Python 2: their str's load as bytes
    data = _ArraysOnly(io.BytesIO(_read_member(tar, members, name)), encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError) as e:
    raise BuildError(f"{tar.name}: {name} is not a readable pickle ({e}).") from None
  if not isinstance(data, dict):
    raise BuildError(f"{tar.name}: {name} holds a {type(data).__name__}, not a dict.")
  data = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
  missing = [k for k in keys if k not in data]
  if missing:
    raise BuildError(f"{tar.name}: {name} has no {missing} (is it CIFAR-100's python version?).")
  return data


def _cifar100_names(tar, members):
  """(fine names (100), coarse names (20)) from the archive's meta."""
  name = "cifar-100-python/meta"
  meta = _cifar100_pickle(tar, members, name, ("fine_label_names", "coarse_label_names"))
  names = [[n.decode() if isinstance(n, bytes) else str(n) for n in meta[k]]
           for k in ("fine_label_names", "coarse_label_names")]
  if [len(n) for n in names] != [100, 20]:
    raise BuildError(f"{tar.name}: {name} has {len(names[0])} fine and {len(names[1])} coarse "
                     f"label names; CIFAR-100 has 100 and 20.")
  return names


def _cifar100_split(tar, members, split):
  """(images (N, 32, 32, 3) uint8, fine labels (N,), coarse labels (N,)) of `split`."""
  name = f"cifar-100-python/{split}"
  data = _cifar100_pickle(tar, members, name, ("data", "fine_labels", "coarse_labels"))
  pixels = np.asarray(data["data"])
  if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
    raise BuildError(f"{tar.name}: {name} data is {pixels.dtype} {pixels.shape}, expected "
                     f"uint8 (N, 3072).")
  images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows are CHW
  labels = []
  for key, num in (("fine_labels", 100), ("coarse_labels", 20)):
    values = np.asarray(data[key], np.int64).reshape(-1)
    if len(values) != len(images):
      raise BuildError(f"{tar.name}: {name} has {len(values)} {key} for {len(images)} images.")
    bad = np.flatnonzero((values < 0) | (values >= num))
    if bad.size:
      raise BuildError(f"{tar.name}: {name} {key}[{bad[0]}] = {values[bad[0]]} is out of range "
                       f"0..{num - 1}.")
    labels.append(values)
  return images, labels[0], labels[1]


def _cifar100_features(fine_names, coarse_names):
  """TFDS' cifar100 features (the catalog builder sets the names from the archive too)."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "image": tfds.features.Image(shape=(32, 32, 3)),
      "label": tfds.features.ClassLabel(names=fine_names),
      "coarse_label": tfds.features.ClassLabel(names=coarse_names),
  })


def _cifar100_examples(split, images, fine, coarse):
  """TFDS' cifar100 examples: keyed by the index in file order, id "<split>_00000"."""
  for i, image in enumerate(images):
    yield i, {"id": f"{split}_{i:05d}", "image": writer.png(image), "label": int(fine[i]),
              "coarse_label": int(coarse[i])}


def build_cifar100(source, data_dir=None, overwrite=False):
  """Prepares TFDS' `cifar100` (3.0.2) from cifar-100-python.tar.gz (`source`), read in place.

  Splits train and test in the archive's order; returns a read-only builder. An existing
  build is reused unless `overwrite`. The archive's pickles are unpickled: use the original.
  """
  return writer.build_once(CIFAR100_NAME, CIFAR100_VERSION, data_dir, overwrite, _write_cifar100,
                           source)


def _write_cifar100(data_dir, source):
  with _open_tar(source, "CIFAR-100") as tar:
    members = _members(tar)
    fine_names, coarse_names = _cifar100_names(tar, members)
    splits = {s: _cifar100_split(tar, members, s) for s in ("train", "test")}
  writer.write(CIFAR100_NAME, data_dir, _cifar100_features(fine_names, coarse_names),
               {s: _cifar100_examples(s, *arrays) for s, arrays in splits.items()},
               f"CIFAR-100 from {source}, as TFDS' cifar100.", CIFAR100_VERSION)
  logging.info("Built %s in %s from %s: %s", CIFAR100_NAME, data_dir, source,
               {s: len(arrays[0]) for s, arrays in splits.items()})


# svhn_cropped


def _svhn_files(source):
  """{split: path} of the .mat files in directory `source`; `extra` may be missing."""
  source = os.path.expanduser(os.fspath(source))
  if not os.path.isdir(source):
    raise SourceMissing(f"SVHN directory {source!r} does not exist.")
  files = {}
  for split, file_name in SVHN_FILES.items():
    path = os.path.join(source, file_name)
    if os.path.isfile(path):
      files[split] = path
    elif split == "extra":
      logging.warning("%s not found: building %s without its 'extra' split.", path, SVHN_NAME)
    else:
      raise SourceMissing(f"SVHN file {path!r} does not exist.")
  return files


def _svhn_mat(path, names):
  """The variables `names` of the .mat file `path`."""
  from scipy import io as sio  # pylint: disable=g-import-not-at-top
  try:
    data = sio.loadmat(path, variable_names=names)
  except (ValueError, OSError, NotImplementedError, sio.matlab.MatReadError) as e:
    raise BuildError(f"{path}: not a readable .mat file ({e}).") from None
  missing = [n for n in names if n not in data]
  if missing:
    raise BuildError(f"{path} has no variable {missing[0]!r} (is it SVHN's *_32x32.mat?).")
  return data


def _svhn_labels(path):
  """Labels 0..9 of an SVHN .mat file (y % 10: 10 is digit 0); checks y and X's shape."""
  from scipy import io as sio  # pylint: disable=g-import-not-at-top
  y = _svhn_mat(path, ["y"])["y"]
  y = np.asarray(y).reshape(-1)
  shapes = {n: (shape, cls) for n, shape, cls in sio.whosmat(path)}
  x_shape, x_class = shapes.get("X", (None, None))
  if x_shape is None or tuple(x_shape) != (32, 32, 3, len(y)) or x_class != "uint8":
    raise BuildError(f"{path}: X is {x_class} {x_shape}, expected uint8 (32, 32, 3, {len(y)}).")
  bad = np.flatnonzero((y < 1) | (y > 10) | (y != np.round(y)))
  if bad.size:
    raise BuildError(f"{path}: y[{bad[0]}] = {y[bad[0]]} is out of range 1..10.")
  return y.astype(np.int64) % 10


def _svhn_examples(split, path, labels):
  """TFDS' svhn_cropped examples of one file, keyed by index; X is read here, when written."""
  images = _svhn_mat(path, ["X"])["X"]
  for i, label in enumerate(labels):
    yield i, {"image": writer.png(images[..., i]), "label": int(label), "id": f"{split}_{i:06d}"}


def _svhn_features():
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(32, 32, 3)),
      "label": tfds.features.ClassLabel(num_classes=10),
      "id": tfds.features.Text(),
  })


def build_svhn_cropped(source, data_dir=None, overwrite=False):
  """Prepares TFDS' `svhn_cropped` (3.1.0) from the .mat files in directory `source`.

  train_32x32.mat -> train, test_32x32.mat -> test, extra_32x32.mat -> extra (skipped, with a
  warning, when absent). Returns a read-only builder; a build is reused unless `overwrite`.
  """
  return writer.build_once(SVHN_NAME, SVHN_VERSION, data_dir, overwrite, _write_svhn_cropped,
                           source)


def _write_svhn_cropped(data_dir, source):
  files = _svhn_files(source)
  labels = {s: _svhn_labels(path) for s, path in files.items()}  # all checked before writing
  writer.write(SVHN_NAME, data_dir, _svhn_features(),
               {s: _svhn_examples(s, path, labels[s]) for s, path in files.items()},
               f"SVHN cropped digits from {source}, as TFDS' svhn_cropped.", SVHN_VERSION)
  logging.info("Built %s in %s from %s: %s", SVHN_NAME, data_dir, source,
               {s: len(y) for s, y in labels.items()})


# food101


def _food101_features():
  """TFDS' food101 2.0.0 features: the label names are TFDS' own names file."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(),
      "label": tfds.features.ClassLabel(names_file=tfds.core.tfds_path(_FOOD101_NAMES_FILE)),
  })


def _food101_lines(tar, members, name):
  """(line number, text) of the non-empty lines of archive member `name`."""
  text = _read_member(tar, members, name).decode("utf-8")
  return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _food101_rows(tar, members, class_names):
  """{split: [(image name, label, TarInfo)]} from meta/train.txt and meta/test.txt, checked."""
  index = {c: i for i, c in enumerate(class_names)}
  for n, c in _food101_lines(tar, members, "food-101/meta/classes.txt"):
    if c not in index:
      raise BuildError(f"{tar.name}: food-101/meta/classes.txt line {n}: unknown class {c!r} "
                       f"(not in TFDS' Food-101 names).")
  rows = {}
  for split, list_name in (("train", "food-101/meta/train.txt"),
                           ("validation", "food-101/meta/test.txt")):
    rows[split], seen = [], set()
    for n, image_name in _food101_lines(tar, members, list_name):
      c, _, _ = image_name.partition("/")
      if c not in index:
        raise BuildError(f"{tar.name}: {list_name} line {n}: unknown class {c!r} in "
                         f"{image_name!r} (not in TFDS' Food-101 names).")
      if image_name in seen:
        raise BuildError(f"{tar.name}: {list_name} line {n}: {image_name!r} is listed twice.")
      seen.add(image_name)
      member = f"food-101/images/{image_name}.jpg"
      if member not in members:
        raise SourceMissing(f"{tar.name}: no member {member!r} (listed in {list_name} "
                            f"line {n}).")
      rows[split].append((image_name, index[c], members[member]))
  return rows


def _food101_examples(tar, split, rows):
  """TFDS' food101 examples, keyed by image name, the JPEG bytes as they are in the archive.

  Read in archive order, so a .tar.gz is decompressed once per split, one image at a time.
  Each image is decoded; at the end of the split, ValueError names those that don't (the
  build then keeps nothing).
  """
  bad = []
  for image_name, label, member in sorted(rows, key=lambda row: row[2].offset_data):
    data = tar.extractfile(member).read()
    why = writer.decode_error(data)
    if why:
      bad.append((member.name, why))
    else:
      yield image_name, {"image": data, "label": label}
  if bad:
    raise BuildError(f"{tar.name}: {len(bad)} of the {len(rows)} {split} images do not decode: "
                     f"{writer.bad_list(bad)}.")


def build_food101(source, data_dir=None, overwrite=False):
  """Prepares TFDS' `food101` (2.0.0) from food-101.tar.gz (`source`), read in place.

  Splits: train (meta/train.txt) and validation (meta/test.txt, as in TFDS). Returns a read-only
  builder; an existing build is reused unless `overwrite`.
  """
  return writer.build_once(FOOD101_NAME, FOOD101_VERSION, data_dir, overwrite, _write_food101,
                           source)


def _write_food101(data_dir, source):
  features = _food101_features()
  with _open_tar(source, "Food-101") as tar:
    rows = _food101_rows(tar, _members(tar), features["label"].names)
    writer.write(FOOD101_NAME, data_dir, features,
                 {s: _food101_examples(tar, s, split_rows) for s, split_rows in rows.items()},
                 f"Food-101 from {source}, as TFDS' food101.", FOOD101_VERSION)
  logging.info("Built %s in %s from %s: %s", FOOD101_NAME, data_dir, source,
               {s: len(split_rows) for s, split_rows in rows.items()})


# Every dataset built from the files its site distributes (--source), ade20k.py's included.
CATALOG_BUILDERS = {CIFAR100_NAME: build_cifar100, SVHN_NAME: build_svhn_cropped,
                    FOOD101_NAME: build_food101, ade20k.NAME: ade20k.build}
CATALOG_SOURCES[ade20k.NAME] = ade20k.SOURCE