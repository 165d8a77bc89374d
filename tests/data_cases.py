"""What the data tests share (test_builders.py, test_catalog.py, test_pipeline.py): a data config
for tiny images, image folders written with or without bad files, and module-scoped datasets
(digits, digits with a damaged chunk, an image folder) built once per test module."""
import os
import shutil

import numpy as np
import pytest

import dataset_archives
from adaptor_jax.data import builders, pipeline, writer
SIZE = 16  # output image side in these tests


def make_cfg(name, data_dir, **overrides):
  cfg = pipeline.default_data_config()
  cfg.name, cfg.data_dir, cfg.image_size, cfg.num_workers = name, str(data_dir), SIZE, 0
  cfg.update(overrides)
  return cfg


def write_folder(root, counts, rng, corrupt=()):
  """root/<class>/<i>.{png,jpg} random images (counts: {class: n}); corrupt: extra bad .jpg's."""
  files = {}
  for c, n in counts.items():
    os.makedirs(root / c, exist_ok=True)
    for i in range(n):
      fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
      data = dataset_archives.image_bytes(rng, fmt)
      (root / c / f"{i:03d}.{ext}").write_bytes(data)
      files[f"{c}/{i:03d}.{ext}"] = data
  for rel in corrupt:
    data = b"\xff\xd8\xff\xe0 not really a jpeg " + rng.bytes(64)
    (root / rel).write_bytes(data)
    files[rel] = data
  return files


def write_unchecked(root, data_dir, name):
  """Builds the image folder `root` as `name` past the builder's decode check (corrupt files
  kept), with the builder's own scan and writer."""
  # pylint: disable=protected-access
  class_names, examples = builders._folder_examples(str(root), 0.1, 0)
  writer.write(name, str(data_dir), writer.image_features(class_names),
               {s: writer.file_examples(rows) for s, rows in examples.items()}, "")
  # pylint: enable=protected-access


def records(cfg, split):
  source = pipeline.open_source(cfg, split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builders.build_digits(data_dir)
  return data_dir


DIGITS_TRAIN_FILE = "digits-train.array_record-00000-of-00001"


@pytest.fixture(scope="module")
def corrupt_digits(digits_dir, tmp_path_factory):
  """A copy of digits whose train file has 4 KiB of random bytes at offset 262144 (a few
  records in the corrupted chunks cannot be read): (data_dir, their record indices)."""
  data_dir = tmp_path_factory.mktemp("corrupt")
  shutil.copytree(digits_dir / "digits", data_dir / "digits")
  path = data_dir / "digits" / "1.0.0" / DIGITS_TRAIN_FILE
  assert path.stat().st_size > 262144 + 4096
  with open(path, "r+b") as f:
    f.seek(262144)
    f.write(np.random.default_rng(0).bytes(4096))
  source = pipeline.open_source(make_cfg("digits", data_dir), "train")
  bad = set()
  for i in range(len(source)):
    try:
      source[i]
    except RuntimeError:
      bad.add(i)
  assert 0 < len(bad) < 100, len(bad)
  return data_dir, bad


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """An image-folder dataset with explicit splits: train 3 classes x 8 (+2 corrupt), val 5 (+1)."""
  base = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  root = base / "images"
  train = write_folder(root / "train", {"cat": 8, "dog": 8, "eel": 8}, rng,
                       corrupt=("cat/bad1.jpg", "eel/bad2.JPG"))
  val = write_folder(root / "validation", {"cat": 2, "dog": 1, "eel": 2}, rng,
                     corrupt=("dog/bad3.jpeg",))
  (root / "train" / "cat" / "notes.txt").write_text("not an image")
  write_unchecked(root, base / "tfds", "tiny_folder")  # the builder would refuse the bad ones
  return dict(data_dir=base / "tfds", name="tiny_folder", train=train, validation=val)
