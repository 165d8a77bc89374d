r"""Our own TFDS datasets (`digits`, image folders) and the command line that builds every
dataset of ours in ArrayRecord format, without TensorFlow, the catalog's included.

  python -m adaptor_jax.data.builders --dataset=digits --data_dir=DIR
  python -m adaptor_jax.data.builders --dataset=image_folder --root=DIR --name=NAME --data_dir=DIR
  python -m adaptor_jax.data.builders --dataset=cifar100 --source=PATH/cifar-100-python.tar.gz \
      --data_dir=DIR
  python -m adaptor_jax.data.builders --dataset=svhn_cropped --source=DIR_WITH_MAT_FILES \
      --data_dir=DIR
  python -m adaptor_jax.data.builders --dataset=food101 --source=PATH/food-101.tar.gz --data_dir=DIR
  python -m adaptor_jax.data.builders --dataset=ade20k --source=ADEChallengeData2016.zip \
      --data_dir=DIR

Two builders of our own, both storing encoded images (TFDS only needs TensorFlow to encode numpy
arrays):
- `digits`: scikit-learn's bundled handwritten digits (1797 8x8 scans, 10 classes "0".."9", no
  download), scaled to 0..255 and stored as RGB PNG; a stratified 80/20 split with a fixed seed
  gives 1437 train / 360 validation examples.
- image folders: root/<class>/*.{jpg,jpeg,png}, the original file bytes (no re-encode), split at
  random per class, or root/{train,validation}/<class>/... when those directories exist. Every
  file is decoded first (transforms.decode, as the pipeline does): files that are not images
  make the build fail, one line listing the first few and the count, before anything is
  written; with skip_bad (--skip_bad) they are left out, with one warning line.
Their features: image (encoded bytes, decoded as (H, W, 3) uint8), label (ClassLabel), file_name
(path relative to the split's root). Neither is registered in TFDS' registry:
`tfds.builder(name, data_dir=...)` and `tfds.data_source` find them from their files on disk.

The datasets built from the files their sites distribute (cifar100, svhn_cropped, food101,
ade20k) are catalog.py's and ade20k.py's; this command line builds them too. Every one is written
with writer.py (the TFDS ArrayRecord writer). Arrays are encoded as PNG with PIL (lossless; TFDS
stores arrays as PNG too): nothing to check.
"""
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging

from adaptor_jax import commands, paths
from adaptor_jax.data import writer
from adaptor_jax.data.catalog import CATALOG_BUILDERS, CATALOG_SOURCES
from adaptor_jax.data.writer import DEFAULT_VERSION, BuildError, SourceMissing

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DIGITS_NAME = "digits"
DIGITS_SPLIT_SEED = 0
DIGITS_VALIDATION_FRACTION = 0.2
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


# ---------------------------------------------------------------------------------------------
# digits


def digits_arrays():
  """(images (1797, 8, 8) uint8 in 0..255, labels (1797,) int64, train_idx, validation_idx).

  The split is stratified by label, 80/20, with a fixed seed; indices refer to sklearn's order.
  """
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  labels = digits.target.astype(np.int64)
  train_idx, val_idx = model_selection.train_test_split(
      np.arange(len(labels)), test_size=DIGITS_VALIDATION_FRACTION, stratify=labels,
      random_state=DIGITS_SPLIT_SEED)
  return images, labels, np.sort(train_idx), np.sort(val_idx)


def _png_rgb(gray_u8):
  return writer.png(np.repeat(gray_u8[:, :, None], 3, axis=2))


def build_digits(data_dir=None):
  """Prepares `digits` under `data_dir` (a path or URL; TFDS default when None) unless it is
  there already. Returns a read-only builder of the prepared dataset. file_name is
  "<sklearn index>.png". (It takes a second: no progress bars.)"""
  tfds.display_progress_bar(False)
  try:
    return writer.build_once(DIGITS_NAME, DEFAULT_VERSION, data_dir, False, _write_digits)
  finally:
    tfds.display_progress_bar(True)


def _write_digits(data_dir):
  images, labels, train_idx, val_idx = digits_arrays()
  rows = lambda idx: writer.file_examples(
      (f"{i:04d}.png", int(labels[i]), _png_rgb(images[i])) for i in idx)
  writer.write(DIGITS_NAME, data_dir, writer.image_features([str(c) for c in range(10)]),
               {"train": rows(train_idx), "validation": rows(val_idx)},
               "scikit-learn's handwritten digits (UCI optdigits test set), 8x8, RGB PNG.")
  logging.info("Built %s in %s: %d train, %d validation", DIGITS_NAME, data_dir,
               len(train_idx), len(val_idx))


# ---------------------------------------------------------------------------------------------
# image folders


def _is_image(path):
  name = os.path.basename(path)
  return (not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
          and os.path.isfile(path))


def _class_dirs(root):
  return sorted(d for d in os.listdir(root)
                if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


def _scan(root, class_names=None):
  """{class: [relative image paths, sorted]} of root/<class>/... (recursively)."""
  class_names = _class_dirs(root) if class_names is None else class_names
  found = {}
  for c in class_names:
    files = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, c)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                if _is_image(os.path.join(dirpath, f))]
    found[c] = sorted(files)
  return found


def _folder_examples(root, validation_fraction, seed):
  """(class names, {split: [(file_name, label, path)]}) of an image folder."""
  if not os.path.isdir(root):
    raise SourceMissing(f"Image folder root {root!r} does not exist.")
  explicit = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "validation"))
  if explicit:
    class_names = _class_dirs(os.path.join(root, "train"))
    extra = set(_class_dirs(os.path.join(root, "validation"))) - set(class_names)
    if extra:
      raise BuildError(f"{root}/validation has classes missing from {root}/train: {sorted(extra)}")
    split_files = {s: _scan(os.path.join(root, s), class_names) for s in ("train", "validation")}
    examples = {s: [(f, i, os.path.join(root, s, f)) for i, c in enumerate(class_names)
                    for f in files[c]] for s, files in split_files.items()}
  else:
    if not 0.0 <= validation_fraction < 1.0:
      raise BuildError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    files = _scan(root)
    class_names = sorted(files)
    rng = np.random.default_rng(seed)
    examples = {"train": [], "validation": []}
    for i, c in enumerate(class_names):  # stratified: the same fraction of every class
      order = rng.permutation(len(files[c]))
      n_val = int(round(validation_fraction * len(order)))
      for rank, j in enumerate(order):
        split = "validation" if rank < n_val else "train"
        examples[split].append((files[c][j], i, os.path.join(root, files[c][j])))
  examples = {s: rows for s, rows in examples.items() if rows}
  if not class_names or "train" not in examples:
    layout = "root/train/<class>/*.jpg" if explicit else "root/<class>/*.jpg"
    raise BuildError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r}; "
                     f"expected {layout}.")
  empty = [c for i, c in enumerate(class_names)
           if not any(label == i for rows in examples.values() for _, label, _ in rows)]
  if empty:
    logging.warning("Image folder %s: classes without images: %s", root, empty)
  return class_names, examples


def check_name(name):
  """Raises ValueError unless `name` can name a new TFDS dataset (not one TFDS already knows)."""
  if not _NAME_RE.match(name or ""):
    raise BuildError(f"Dataset name {name!r} must match {_NAME_RE.pattern} (snake_case).")
  if name == DIGITS_NAME:
    raise BuildError(f"Dataset name {name!r} is reserved for the demo dataset.")
  try:
    tfds.builder_cls(name)
  except tfds.core.registered.DatasetNotFoundError:
    return
  raise BuildError(f"Dataset name {name!r} is a TFDS catalog dataset; choose another name.")


def build_image_folder(root, data_dir, name, validation_fraction=0.1, seed=0, overwrite=False,
                       skip_bad=False):
  """Prepares dataset `name` under `data_dir` from the image folder `root`; returns its builder.

  root/<class>/*.{jpg,jpeg,png} (any depth below the class directory) is split per class at
  random (`validation_fraction`, `seed`); when root/train/<class> and root/validation/<class>
  exist, those are the splits. Class names are the sorted class directory names; other files
  are skipped; images are stored as their original bytes. Every image is decoded first: one that
  does not decode raises ValueError (naming the first few and the count; nothing is written),
  or with `skip_bad` is left out with a warning. An existing dataset of that name is reused
  unless `overwrite`. Read it back with `tfds.data_source(name, data_dir=data_dir)` or
  `pipeline.open_source` with `config.data.name = name`.
  """
  check_name(name)
  return writer.build_once(name, DEFAULT_VERSION, data_dir, overwrite, _write_image_folder, root,
                           name, validation_fraction, seed, skip_bad)


def _checked_rows(root, examples, skip_bad):
  """`examples` ({split: [(file_name, label, path)]}) without the files that don't decode.

  Raises ValueError naming them unless `skip_bad` (then one warning line).
  """
  bad, total = [], 0
  for rows in examples.values():
    for _, _, path in rows:
      total += 1
      with open(path, "rb") as f:
        why = writer.decode_error(f.read())
      if why:
        bad.append((os.path.relpath(path, root), why))
  if not bad:
    return examples
  bad.sort()
  what = f"Image folder {root}: {len(bad)} of {total} files do not decode as images: "
  if not skip_bad:
    raise BuildError(what + writer.bad_list(bad) + "; fix or remove them, or pass "
                     "skip_bad=True (--skip_bad) to leave them out.")
  logging.warning("%s%s; left out (skip_bad).", what, writer.bad_list(bad))
  paths = {os.path.join(root, rel) for rel, _ in bad}
  examples = {s: [r for r in rows if r[2] not in paths] for s, rows in examples.items()}
  return {s: rows for s, rows in examples.items() if rows}


def _write_image_folder(data_dir, root, name, validation_fraction, seed, skip_bad):
  root = os.path.expanduser(os.fspath(root))
  class_names, examples = _folder_examples(root, validation_fraction, seed)
  examples = _checked_rows(root, examples, skip_bad)
  if "train" not in examples:
    raise BuildError(f"Image folder {root}: no train image decodes.")
  writer.write(name, data_dir, writer.image_features(class_names),
               {s: writer.file_examples(rows) for s, rows in examples.items()},
               f"Image folder {root}.")
  logging.info("Built %s in %s from %s: %s", name, data_dir, root,
               {s: len(rows) for s, rows in examples.items()})


# ---------------------------------------------------------------------------------------------
# command line

def _define_flags():
  """The CLI's flags (defined only when run as a script, so importers' flags never clash)."""
  flags.DEFINE_enum("dataset", None, ["digits", "image_folder", *CATALOG_BUILDERS],
                    "What to build.")
  flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS').")
  flags.DEFINE_string("root", None, "image_folder: root/<class>/*.jpg.")
  flags.DEFINE_string("name", None, "image_folder: the dataset's name (snake_case).")
  flags.DEFINE_float("validation_fraction", 0.1, "image_folder: held-out fraction per class.")
  flags.DEFINE_integer("seed", 0, "image_folder: seed of the random split.")
  flags.DEFINE_string("source", None, "cifar100: cifar-100-python.tar.gz; svhn_cropped: the "
                      "directory of train_32x32.mat, test_32x32.mat (, extra_32x32.mat); "
                      "food101: food-101.tar.gz; ade20k: ADEChallengeData2016.zip or its "
                      "folder.")
  flags.DEFINE_bool("overwrite", False, "All but digits: rebuild if it exists.")
  flags.DEFINE_bool("skip_bad", False, "image_folder: leave out files that do not decode "
                    "(default: refuse to build, naming them).")


def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("root", "source"):
    if f[name].value and paths.is_url(f[name].value):
      raise app.UsageError(f"--{name}={f[name].value}: the files to build from must be on "
                           "this machine's disk (copy them first, e.g. gcloud storage cp -r); "
                           "--data_dir may be a bucket")
  if f.dataset == "digits":
    builder = build_digits(f.data_dir)
  elif f.dataset == "image_folder":
    if not f.root or not f.name:
      raise app.UsageError("--dataset=image_folder needs --root and --name")
    builder = build_image_folder(f.root, f.data_dir, f.name, f.validation_fraction, f.seed,
                                 f.overwrite, f.skip_bad)
  elif f.dataset in CATALOG_BUILDERS:
    if not f.source:
      raise app.UsageError(f"--dataset={f.dataset} needs --source="
                           f"{CATALOG_SOURCES[f.dataset][2]}")
    builder = CATALOG_BUILDERS[f.dataset](f.source, f.data_dir, f.overwrite)
  else:
    raise app.UsageError(f"--dataset is required: one of digits, image_folder, "
                         f"{', '.join(CATALOG_BUILDERS)}")
  splits = {s: info.num_examples for s, info in builder.info.splits.items()}
  features, metadata = builder.info.features, builder.info.metadata or {}
  classes = (features["label"].num_classes if "label" in features
             else len(metadata.get("class_names", [])))
  print(f"{builder.info.name} in {builder.data_dir}: {classes} classes, {splits}")


if __name__ == "__main__":
  _define_flags()
  commands.run(main)
