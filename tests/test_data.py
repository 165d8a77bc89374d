"""Dataset builders and grain pipelines: sizes and pixels against sklearn and the source files,
batches against the transforms applied to the stored records, sharding, determinism, iterator
state (also through orbax), corrupt records and errors."""
import collections
import logging
import os
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

import dataset_archives
from adaptor_jax import errors
from adaptor_jax.data import builders, catalog, pipeline, transforms

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
  builders.write(name, str(data_dir), builders._features(class_names),
                  {s: builders._file_examples(rows) for s, rows in examples.items()}, "")
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


# ---------------------------------------------------------------------------------------------
# builders


def test_digits_builder_matches_sklearn(digits_dir):
  cfg = make_cfg("digits", digits_dir)
  digits = sk_datasets.load_digits()
  assert pipeline.num_classes(cfg) == 10
  assert pipeline.num_examples(cfg, "train") == 1437
  assert pipeline.num_examples(cfg, "validation") == 360
  seen = collections.Counter()
  for split in ("train", "validation"):
    per_class = collections.Counter()
    for rec in records(cfg, split):
      i = int(rec["file_name"].decode().split(".")[0])
      seen[i] += 1
      per_class[rec["label"]] += 1
      assert rec["label"] == digits.target[i]
      expected = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
      np.testing.assert_array_equal(transforms.decode(rec["image"]),
                                    np.repeat(expected[:, :, None], 3, axis=2))
    if split == "validation":  # stratified 20%: every class 35..37 of its ~180
      assert all(35 <= per_class[c] <= 37 for c in range(10)), per_class
  assert sorted(seen) == list(range(1797)) and set(seen.values()) == {1}
  shard = next((digits_dir / "digits" / "1.0.0").glob("digits-train.array_record*"))
  mtime = shard.stat().st_mtime_ns
  builders.build_digits(digits_dir)  # prepared already: nothing is rewritten
  assert shard.stat().st_mtime_ns == mtime


def test_image_folder_explicit_splits_store_original_bytes(folder):
  cfg = make_cfg(folder["name"], folder["data_dir"])
  assert pipeline.open_builder(cfg).info.features["label"].names == ["cat", "dog", "eel"]
  for split in ("train", "validation"):
    got = {r["file_name"].decode(): r for r in records(cfg, split)}
    assert set(got) == set(folder[split])  # notes.txt skipped, corrupt images kept (unchecked)
    for rel, data in folder[split].items():
      assert got[rel]["image"] == data
      assert got[rel]["label"] == ["cat", "dog", "eel"].index(rel.split("/")[0])


def test_image_folder_random_split(tmp_path):
  rng = np.random.default_rng(1)
  files = write_folder(tmp_path / "root", {"b": 10, "a": 20}, rng)
  builders.build_image_folder(tmp_path / "root", tmp_path / "tfds", "rand_split",
                              validation_fraction=0.2, seed=3)
  cfg = make_cfg("rand_split", tmp_path / "tfds")
  split = {s: {r["file_name"].decode(): r for r in records(cfg, s)} for s in
           ("train", "validation")}
  assert set(split["train"]) | set(split["validation"]) == set(files)
  assert not set(split["train"]) & set(split["validation"])
  val_classes = collections.Counter(r["label"] for r in split["validation"].values())
  assert val_classes == {0: 4, 1: 2}  # 20% of a (label 0, 20 images) and of b (label 1, 10)
  for rel, r in {**split["train"], **split["validation"]}.items():
    assert r["image"] == files[rel] and r["label"] == "ab".index(rel[0])
  # The same seed gives the same split (a rebuild under another name).
  builders.build_image_folder(tmp_path / "root", tmp_path / "tfds", "rand_split2",
                              validation_fraction=0.2, seed=3)
  again = {r["file_name"].decode() for r in records(make_cfg("rand_split2", tmp_path / "tfds"),
                                                    "validation")}
  assert again == set(split["validation"])
  # An existing dataset is reused, unless overwritten.
  builders.build_image_folder(tmp_path / "root", tmp_path / "tfds", "rand_split",
                              validation_fraction=0.5)
  assert pipeline.num_examples(cfg, "validation") == 6
  builders.build_image_folder(tmp_path / "root", tmp_path / "tfds", "rand_split",
                              validation_fraction=0.5, overwrite=True)
  assert pipeline.num_examples(cfg, "validation") == 15


def test_image_folder_errors(tmp_path):
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  (tmp_path / "empty" / "cls" / "readme.md").write_text("no images")
  with pytest.raises(ValueError, match="No images"):
    builders.build_image_folder(tmp_path / "empty", tmp_path / "tfds", "empty_ds")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    builders.build_image_folder(tmp_path / "missing", tmp_path / "tfds", "missing_ds")
  with pytest.raises(ValueError, match="catalog"):
    builders.build_image_folder(tmp_path / "empty", tmp_path / "tfds", "mnist")
  with pytest.raises(ValueError, match="catalog"):  # only build_cifar100 writes cifar100
    builders.build_image_folder(tmp_path / "empty", tmp_path / "tfds", "cifar100")
  with pytest.raises(ValueError, match="reserved"):
    builders.build_image_folder(tmp_path / "empty", tmp_path / "tfds", "digits")
  with pytest.raises(ValueError, match="snake_case"):
    builders.build_image_folder(tmp_path / "empty", tmp_path / "tfds", "My Data")


def test_image_folder_refuses_files_that_are_not_images(tmp_path, caplog):
  rng = np.random.default_rng(9)
  files = write_folder(tmp_path / "root", {"a": 4, "b": 4}, rng)
  for i in range(7):  # text files named *.png
    (tmp_path / "root" / "ab"[i % 2] / f"text{i}.png").write_text(f"not an image {i}")
  with pytest.raises(ValueError) as e:
    builders.build_image_folder(tmp_path / "root", tmp_path / "tfds", "texts")
  msg = str(e.value)
  assert "\n" not in msg
  assert "7 of 15 files do not decode as images: a/text0.png (decode: undecodable image" in msg
  assert "and 2 more; fix or remove them, or pass skip_bad=True" in msg
  assert not (tmp_path / "tfds" / "texts").exists()
  with caplog.at_level(logging.WARNING):
    builders.build_image_folder(tmp_path / "root", tmp_path / "tfds", "texts", skip_bad=True,
                                validation_fraction=0.0)
  assert any("7 of 15 files do not decode" in r.getMessage() and "left out" in r.getMessage()
             for r in caplog.records)
  got = {r["file_name"].decode() for r in records(make_cfg("texts", tmp_path / "tfds"), "train")}
  assert got == set(files)
  for i in range(4):  # only text files: refused, however skip_bad is set
    (tmp_path / "texts_only" / "c").mkdir(parents=True, exist_ok=True)
    (tmp_path / "texts_only" / "c" / f"{i}.png").write_text("text")
  with pytest.raises(ValueError, match=r"4 of 4 files do not decode as images: c/0.png"):
    builders.build_image_folder(tmp_path / "texts_only", tmp_path / "tfds", "texts_only")
  with pytest.raises(ValueError, match="no train image decodes"):
    builders.build_image_folder(tmp_path / "texts_only", tmp_path / "tfds", "texts_only",
                                skip_bad=True)


def test_missing_dataset_or_data_dir_says_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError, match="data_dir.*does not exist"):
    pipeline.open_source(make_cfg("imagenet2012", tmp_path / "nowhere"), "train")
  with pytest.raises(FileNotFoundError, match=r"downloads/manual.*tfds build imagenet2012"):
    pipeline.train_iterator(make_cfg("imagenet2012", tmp_path), batch_size=2, seed=0)
  with pytest.raises(FileNotFoundError, match="adaptor_jax.data.builders --dataset=image_folder"):
    pipeline.num_classes(make_cfg("my_photos", tmp_path))


def test_unknown_split_lists_the_splits(digits_dir):
  cfg = make_cfg("digits", digits_dir, train_split="test")
  with pytest.raises(ValueError, match=r"no split 'test' \(it has \['train', 'validation'\]"):
    pipeline.train_iterator(cfg, batch_size=2, seed=0)
  assert pipeline.num_examples(cfg, "train[:10%]") == 144


def test_catalog_names_read_tfds_own_builder(tmp_path):
  """imagenet2012 resolves to TFDS' registered builder, reading prepared ArrayRecord files.

  The files stand in for `tfds build imagenet2012` (which needs TensorFlow): our writer with
  the catalog's name, version and features.
  """
  rng = np.random.default_rng(2)
  rows = [(f"n{i:08d}_{i}.JPEG", 100 * i, dataset_archives.image_bytes(rng, "JPEG")) for i in range(6)]
  fake = type("FakeImagenet", (builders._Builder,),  # pylint: disable=protected-access
              dict(name="imagenet2012", VERSION=tfds.core.Version("5.1.0"),
                   RELEASE_NOTES={"5.1.0": ""}), skip_registration=True)
  # pylint: disable=protected-access
  builders._prepare(fake(
      data_dir=tmp_path, file_format="array_record",
      features=builders._features([str(i) for i in range(1000)]),
      examples={"train": builders._file_examples(rows[:4]),
                "validation": builders._file_examples(rows[4:])}))
  # pylint: enable=protected-access
  cfg = make_cfg("imagenet2012", tmp_path)
  assert type(pipeline.open_builder(cfg)).__module__.startswith("tensorflow_datasets.datasets")
  assert pipeline.num_classes(cfg) == 1000 and pipeline.num_examples(cfg, "train") == 4
  (batch,) = list(pipeline.eval_iterator(cfg, batch_size=4))
  np.testing.assert_array_equal(batch["mask"], [True, True, False, False])
  assert sorted(batch["label"][:2]) == [400, 500]
  for image, label in zip(batch["image"][:2], batch["label"]):
    expected = transforms.eval_transform(transforms.decode(rows[label // 100][2]), cfg)
    np.testing.assert_array_equal(image, expected)


# ---------------------------------------------------------------------------------------------
# TFDS catalog datasets from their distributed files


def catalog_features(name, tmp_path):
  """repr of the features of TFDS' catalog builder `name` (from the code, no data)."""
  return repr(tfds.builder(name, data_dir=tmp_path / "empty").info.features)


def read_all(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def key_order(split, keys):
  """Keys in the order TFDS' writer stores them: sorted by their hash, salted by the split."""
  hasher = tfds.core.hashing.Hasher(split)
  return sorted(keys, key=hasher.hash_key)


def text(value):
  return value.decode() if isinstance(value, bytes) else value


def test_cifar100_from_python_archive_reads_as_tfds_cifar100(tmp_path):
  rng = np.random.default_rng(3)
  archive = tmp_path / "cifar-100-python.tar.gz"
  fine_names, coarse_names, dicts = dataset_archives.write_cifar100(archive, rng)
  catalog.build_cifar100(archive, tmp_path / "tfds")
  builder = tfds.builder("cifar100", data_dir=tmp_path / "tfds")  # TFDS' registered class
  assert type(builder).__module__ == "tensorflow_datasets.image_classification.cifar"
  assert str(builder.version) == "3.0.2" and builder.is_prepared()
  assert repr(builder.info.features) == catalog_features("cifar100", tmp_path)
  assert builder.info.features["label"].names == fine_names
  assert builder.info.features["coarse_label"].names == coarse_names
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 6, "test": 3}
  assert builder.info.supervised_keys == ("image", "label")
  cfg = make_cfg("cifar100", tmp_path / "tfds", eval_split="test")
  assert pipeline.num_classes(cfg) == 100
  for split in ("train", "test"):
    d = dicts[split]
    images = d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    got = read_all(builder, split)
    ids = [text(r["id"]) for r in got]
    assert ids == [f"{split}_{i:05d}" for i in key_order(split, range(len(images)))]
    for r, encoded in zip(got, records(cfg, split)):
      i = int(text(r["id"]).split("_")[1])
      assert r["label"] == d[b"fine_labels"][i] and r["coarse_label"] == d[b"coarse_labels"][i]
      np.testing.assert_array_equal(r["image"], images[i])
      assert encoded["label"] == r["label"] and encoded["image"][:4] == b"\x89PNG"
      np.testing.assert_array_equal(transforms.decode(encoded["image"]), images[i])
  (batch,) = list(pipeline.eval_iterator(cfg, batch_size=4))
  np.testing.assert_array_equal(batch["mask"], [True, True, True, False])
  assert sorted(batch["label"][:3]) == [3, 57, 99]
  # Prepared already: reused, not rewritten.
  shard = next((tmp_path / "tfds" / "cifar100" / "3.0.2").glob("cifar100-train.array_record*"))
  mtime = shard.stat().st_mtime_ns
  catalog.build_cifar100(archive, tmp_path / "tfds")
  assert shard.stat().st_mtime_ns == mtime


def test_cifar100_errors(tmp_path):
  rng = np.random.default_rng(4)
  with pytest.raises(FileNotFoundError, match="CIFAR-100 archive .*nowhere.tar.gz.* not exist"):
    catalog.build_cifar100(tmp_path / "nowhere.tar.gz", tmp_path / "tfds")
  no_meta = tmp_path / "no_meta.tar.gz"
  dataset_archives.write_cifar100(no_meta, rng, skip=("meta",))
  with pytest.raises(FileNotFoundError, match=r"no_meta.tar.gz: no member 'cifar-100-python/meta'"):
    catalog.build_cifar100(no_meta, tmp_path / "tfds")
  bad_label = tmp_path / "bad_label.tar.gz"
  dataset_archives.write_cifar100(bad_label, rng, fine=((1, 2), (3, 100)))
  with pytest.raises(ValueError, match=r"bad_label.tar.gz: cifar-100-python/test fine_labels\[1\] "
                                       r"= 100 is out of range 0..99"):
    catalog.build_cifar100(bad_label, tmp_path / "tfds")
  assert not (tmp_path / "tfds" / "cifar100" / "3.0.2").exists()


def test_svhn_cropped_from_mat_files_reads_as_tfds_svhn_cropped(tmp_path):
  rng = np.random.default_rng(5)
  arrays = dataset_archives.write_svhn(tmp_path / "svhn", rng, {"train": [10, 1, 5, 10, 9], "test": [3, 10, 7],
                                               "extra": [2, 10]})
  catalog.build_svhn_cropped(tmp_path / "svhn", tmp_path / "tfds")
  builder = tfds.builder("svhn_cropped", data_dir=tmp_path / "tfds")
  assert type(builder).__module__.startswith("tensorflow_datasets.datasets.svhn_cropped")
  assert str(builder.version) == "3.1.0" and builder.is_prepared()
  assert repr(builder.info.features) == catalog_features("svhn_cropped", tmp_path)
  assert builder.info.features["label"].names == [str(i) for i in range(10)]
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": 5, "test": 3, "extra": 2}
  cfg = make_cfg("svhn_cropped", tmp_path / "tfds")
  for split, (x, y) in arrays.items():
    got = read_all(builder, split)
    assert [text(r["id"]) for r in got] == [f"{split}_{i:06d}"
                                            for i in key_order(split, range(len(y)))]
    for r, encoded in zip(got, records(cfg, split)):
      i = int(text(r["id"]).split("_")[1])
      assert r["label"] == y[i, 0] % 10 and encoded["label"] == r["label"]
      np.testing.assert_array_equal(r["image"], x[..., i])
      np.testing.assert_array_equal(transforms.decode(encoded["image"]), x[..., i])
  assert sorted(r["label"] for r in read_all(builder, "train")) == [0, 0, 1, 5, 9]


def test_svhn_cropped_without_extra_and_errors(tmp_path, caplog):
  rng = np.random.default_rng(6)
  dataset_archives.write_svhn(tmp_path / "svhn", rng, {"train": [10, 4], "test": [6]})
  with caplog.at_level(logging.WARNING):
    builder = catalog.build_svhn_cropped(tmp_path / "svhn", tmp_path / "tfds")
  assert sorted(builder.info.splits) == ["test", "train"]
  assert any("extra_32x32.mat not found" in r.getMessage() for r in caplog.records)
  assert pipeline.num_examples(make_cfg("svhn_cropped", tmp_path / "tfds"), "train") == 2
  with pytest.raises(FileNotFoundError, match="SVHN directory .*nowhere.* does not exist"):
    catalog.build_svhn_cropped(tmp_path / "nowhere", tmp_path / "other")
  dataset_archives.write_svhn(tmp_path / "no_test", rng, {"train": [1]})
  with pytest.raises(FileNotFoundError, match="SVHN file .*test_32x32.mat.* does not exist"):
    catalog.build_svhn_cropped(tmp_path / "no_test", tmp_path / "other")
  dataset_archives.write_svhn(tmp_path / "bad", rng, {"train": [1, 11], "test": [2]})
  with pytest.raises(ValueError, match=r"train_32x32.mat: y\[1\] = 11 is out of range 1..10"):
    catalog.build_svhn_cropped(tmp_path / "bad", tmp_path / "other")
  dataset_archives.write_svhn(tmp_path / "zero", rng, {"train": [1], "test": [0]})
  with pytest.raises(ValueError, match=r"test_32x32.mat: y\[0\] = 0 is out of range 1..10"):
    catalog.build_svhn_cropped(tmp_path / "zero", tmp_path / "other")
  assert not (tmp_path / "other" / "svhn_cropped" / "3.1.0").exists()


def test_food101_from_archive_reads_as_tfds_food101(tmp_path):
  rng = np.random.default_rng(7)
  archive = tmp_path / "food-101.tar.gz"
  images, train, test = dataset_archives.write_food101(archive, rng)
  catalog.build_food101(archive, tmp_path / "tfds")
  builder = tfds.builder("food101", data_dir=tmp_path / "tfds")  # the default version: 2.0.0
  assert type(builder).__module__ == "tensorflow_datasets.image_classification.food101"
  assert str(builder.version) == "2.0.0" and builder.is_prepared()
  assert repr(builder.info.features) == catalog_features("food101", tmp_path)
  assert sorted(builder.info.features) == ["image", "label"]
  tfds_names = (tfds.core.tfds_path("image_classification/food-101_classes.txt")
                .read_text().split())
  assert len(tfds_names) == 101 and builder.info.features["label"].names == tfds_names
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": len(train), "validation": len(test)}
  by_bytes = {data: name for name, data in images.items()}
  cfg = make_cfg("food101", tmp_path / "tfds")
  for split, names in (("train", train), ("validation", test)):
    got = records(cfg, split)
    assert [by_bytes[r["image"]] for r in got] == key_order(split, names)  # original bytes
    for r in got:
      name = by_bytes[r["image"]]
      assert r["label"] == tfds_names.index(name.split("/")[0])
    decoded = read_all(builder, split)  # TFDS' decoding
    np.testing.assert_array_equal(decoded[0]["image"], transforms.decode(got[0]["image"]))
  assert {tfds_names[r["label"]] for r in records(cfg, "train")} == set(dataset_archives.FOOD_CLASSES)
  assert [tfds_names.index(c) for c in dataset_archives.FOOD_CLASSES] == [0, 2, 100]


def test_food101_errors(tmp_path):
  rng = np.random.default_rng(8)
  with pytest.raises(FileNotFoundError, match="Food-101 archive .*food-101.tar.gz.* not exist"):
    catalog.build_food101(tmp_path / "food-101.tar.gz", tmp_path / "tfds")
  (tmp_path / "not_a_tar.tar.gz").write_bytes(b"not a tar archive at all")
  with pytest.raises(ValueError, match="not_a_tar.tar.gz: not a readable tar archive"):
    catalog.build_food101(tmp_path / "not_a_tar.tar.gz", tmp_path / "tfds")
  unknown = tmp_path / "unknown.tar.gz"
  dataset_archives.write_food101(unknown, rng, train=["apple_pie/1000", "apple_pies/1001"], test=[])
  with pytest.raises(ValueError, match=r"unknown.tar.gz: food-101/meta/train.txt line 2: "
                                       r"unknown class 'apple_pies'"):
    catalog.build_food101(unknown, tmp_path / "tfds")
  missing = tmp_path / "missing.tar.gz"
  dataset_archives.write_food101(missing, rng, drop=("waffles/1002",))
  with pytest.raises(FileNotFoundError, match=r"missing.tar.gz: no member "
                                              r"'food-101/images/waffles/1002.jpg' \(listed in "
                                              r"food-101/meta/test.txt line 3\)"):
    catalog.build_food101(missing, tmp_path / "tfds")
  bad_jpeg = tmp_path / "bad_jpeg.tar.gz"
  dataset_archives.write_food101(bad_jpeg, rng, corrupt=("waffles/1002",))
  with pytest.raises(ValueError, match=r"bad_jpeg.tar.gz: 1 of the 3 validation images do not "
                                       r"decode: food-101/images/waffles/1002.jpg \(decode: "):
    catalog.build_food101(bad_jpeg, tmp_path / "tfds")
  assert not (tmp_path / "tfds" / "food101" / "2.0.0").exists()


def test_catalog_builders_say_how_to_prepare(tmp_path):
  for name, archive in (("cifar100", "cifar-100-python.tar.gz"),
                        ("svhn_cropped", "train_32x32.mat"), ("food101", "food-101.tar.gz")):
    with pytest.raises(FileNotFoundError, match=f"download {archive}.*adaptor_jax.data.builders "
                                                f"--dataset={name} --source="):
      pipeline.num_classes(make_cfg(name, tmp_path))


# ---------------------------------------------------------------------------------------------
# train pipeline


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_batches_are_the_transformed_records(digits_dir):
  cfg = make_cfg("digits", digits_dir)
  seed, b = 7, 32
  source = pipeline.open_source(cfg, "train")
  batches = take(pipeline.train_iterator(cfg, batch_size=b, seed=seed, with_index=True), 3)
  for j, batch in enumerate(batches):
    assert batch["image"].shape == (b, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (b,) and batch["label"].dtype == np.int32
    assert batch["image"].std() > 10  # real pixels, not a blank
    for row in range(b):
      index = int(batch["index"][row])
      record = source[index]
      assert batch["label"][row] == record["label"] and 0 <= record["label"] < 10
      epoch = (j * b + row) // len(source)
      expected = transforms.train_transform(transforms.decode(record["image"]),
                                             np.random.default_rng([seed, epoch, index]), cfg)
      np.testing.assert_array_equal(batch["image"][row], expected)


def test_train_epochs_are_permutations_and_reshuffle(folder):
  cfg = make_cfg(folder["name"], folder["data_dir"], randaugment="")
  n = pipeline.num_examples(cfg, "train")  # 24 good + 2 corrupt
  good = n - 2
  batches = take(pipeline.train_iterator(cfg, batch_size=2, seed=0, with_index=True), good)
  indices = [b["index"] for b in batches]
  first, second = np.concatenate(indices[:good // 2]), np.concatenate(indices[good // 2:])
  assert len(set(first)) == good and set(first) == set(second)  # each epoch: every good record
  assert not np.array_equal(first, second)  # reshuffled
  source = pipeline.open_source(cfg, "train")
  for j, batch in enumerate(batches):  # augmentation seeded by (seed, epoch, record index)
    for image, index in zip(batch["image"], batch["index"]):
      rng = np.random.default_rng([0, j // (good // 2), int(index)])
      expected = transforms.train_transform(transforms.decode(source[int(index)]["image"]), rng,
                                            cfg)
      np.testing.assert_array_equal(image, expected)


def test_train_same_seed_same_stream_other_seed_differs(digits_dir):
  cfg = make_cfg("digits", digits_dir)
  a = take(pipeline.train_iterator(cfg, batch_size=16, seed=1), 2)
  assert_same(a, take(pipeline.train_iterator(cfg, batch_size=16, seed=1), 2))
  c = take(pipeline.train_iterator(cfg, batch_size=16, seed=2), 2)
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_train_processes_read_disjoint_shards(digits_dir):
  cfg = make_cfg("digits", digits_dir, randaugment="")
  n = 1437
  seen = []
  for k in range(2):
    it = pipeline.train_iterator(cfg, batch_size=240, seed=5, process_index=k,
                                 process_count=2, with_index=True)
    seen.append(np.concatenate([x["index"] for x in take(it, 3)]))
  # The global stream's first 2 * 3 * 240 = 1440 positions: one epoch (1437) and 3 of the next.
  assert len(set(seen[0][:718])) == 718 and len(set(seen[1][:718])) == 718
  first_epoch = np.empty(1440, np.int64)
  first_epoch[0::2], first_epoch[1::2] = seen[0], seen[1]
  assert sorted(first_epoch[:n]) == list(range(n))


def test_iterator_state_restores_the_exact_stream(folder, tmp_path):
  # The corrupt records make batches straddle parent batches: the rebatch state is exercised.
  cfg = make_cfg(folder["name"], folder["data_dir"])
  make = lambda: pipeline.train_iterator(cfg, batch_size=5, seed=11, with_index=True)
  it = make()
  take(it, 3)
  state = it.get_state()
  expected = take(it, 6)
  fresh = make()
  fresh.set_state(state)
  assert_same(expected, take(fresh, 6))

  # Through an orbax CheckpointManager, next to a train state, as the training loop does it.
  it = make()
  take(it, 2)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  params = {"w": np.arange(6.0).reshape(2, 3)}
  mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                       data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = take(it, 6)
  fresh = make()
  restored = mngr.restore(2, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(params), data=grain.checkpoint.CheckpointRestore(fresh)))
  assert restored["data"] is fresh
  np.testing.assert_array_equal(restored["state"]["w"], params["w"])
  assert_same(expected, take(fresh, 6))
  mngr.close()


def test_worker_processes_give_the_same_stream(digits_dir):
  cfg = make_cfg("digits", digits_dir)
  expected = take(pipeline.train_iterator(cfg, batch_size=8, seed=4), 8)
  cfg.num_workers = 2
  it = pipeline.train_iterator(cfg, batch_size=8, seed=4)
  try:
    got = take(it, 5)
    state = it.get_state()
    got += take(it, 3)
    assert_same(expected, got)
    it.set_state(state)  # workers resume from a state too
    assert_same(expected[5:], take(it, 3))
  finally:
    it.close()
  cfg.num_workers = 0
  expected = list(pipeline.eval_iterator(cfg, batch_size=100, with_index=True))
  cfg.num_workers = 2
  assert_same(expected, list(pipeline.eval_iterator(cfg, batch_size=100, with_index=True)))


def test_corrupt_records_are_skipped_and_counted(folder, caplog):
  cfg = make_cfg(folder["name"], folder["data_dir"], randaugment="")
  source = pipeline.open_source(cfg, "train")
  bad = {i for i in range(len(source)) if b"bad" in source[i]["file_name"]}
  assert len(bad) == 2
  with caplog.at_level(logging.WARNING):
    it = pipeline.train_iterator(cfg, batch_size=4, seed=0, with_index=True)
    batches = take(it, 12)
  indices = np.concatenate([b["index"] for b in batches])  # 48 = two epochs of 24 good ones
  assert all(b["image"].shape == (4, SIZE, SIZE, 3) for b in batches)
  assert not bad & set(indices.tolist())
  assert sorted(indices[:24]) == sorted(set(range(len(source))) - bad)
  stats = it.failures()
  assert stats["failed"] == stats["undecodable"] >= 4  # each corrupt record once per epoch
  assert stats["unreadable"] == 0 and stats["seen"] >= 48 + stats["failed"]
  assert stats["by_file"] == {"tiny_folder-train.array_record-00000-of-00001": stats["failed"]}
  assert (stats["dataset"], stats["split"]) == ("tiny_folder", "train")
  warnings = [r.getMessage() for r in caplog.records if "skipping record" in r.getMessage()]
  assert len(warnings) == min(stats["failed"], 5)  # the first 5 only
  assert all("its image does not decode" in w for w in warnings)
  assert {int(w.split("skipping record ")[1].split()[0]) for w in warnings} == bad
  assert warnings[0].startswith("tiny_folder split 'train': skipping record ")
  assert "(tiny_folder-train.array_record-00000-of-00001 record " in warnings[0]


def write_records(data_dir, name, splits):
  """Dataset `name` of {split: [image bytes]}, written as the builders write (labels 0, 1)."""
  # pylint: disable=protected-access
  examples = {s: builders._file_examples((f"{i:03d}.png", i % 2, data)
                                         for i, data in enumerate(rows))
              for s, rows in splits.items()}
  builders.write(name, str(data_dir), builders._features(["a", "b"]), examples, "")
  # pylint: enable=protected-access


@pytest.mark.parametrize("num_workers", [0, 2])
def test_all_undecodable_records_raise_bad_data_error(tmp_path, caplog, num_workers):
  write_records(tmp_path, "all_bad", {"train": [b"text %d" % i for i in range(40)]})
  cfg = make_cfg("all_bad", tmp_path, num_workers=num_workers)
  it = pipeline.train_iterator(cfg, batch_size=8, seed=0)
  try:
    with caplog.at_level(logging.WARNING), pytest.raises(pipeline.BadDataError) as e:
      next(it)
  finally:
    it.close()
  # The default threshold: more than 0.02 of bad_window 10000 = 200: the 26th batch of 8.
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("all_bad split 'train': 208 of the last 208 records read failed, more "
                        "than config.data.max_bad_fraction=0.02 of bad_window=10000; 208 failed "
                        "of 208 read (0 unreadable, 208 undecodable; by file: "
                        "all_bad-train.array_record-00000-of-00001: 208; files in ")
  assert "first: record " in msg and "its image does not decode" in msg
  assert e.value.stats == it.failures() and it.failures()["seen"] == 208
  assert isinstance(e.value, RuntimeError) and isinstance(e.value, errors.UserError)
  assert len([r for r in caplog.records if "all_bad" in r.getMessage()]) == 5


def test_bad_data_threshold_knobs(tmp_path):
  write_records(tmp_path, "half_bad", {"train": [b"text", dataset_archives.image_bytes(
      np.random.default_rng(0), "PNG")] * 10})
  cfg = make_cfg("half_bad", tmp_path, max_bad_fraction=1.0, bad_window=50)
  it = pipeline.train_iterator(cfg, batch_size=5, seed=0)
  take(it, 20)  # half fail, but never a window of nothing but failures
  stats = it.failures()
  assert stats["seen"] >= 200 and abs(stats["failed"] - stats["seen"] / 2) <= 10
  cfg.max_bad_fraction = 0.4  # more than 20 of the last 50 failed
  with pytest.raises(pipeline.BadDataError, match=r"2\d of the last \d\d records read failed, "
                                                  r"more than config.data.max_bad_fraction=0.4 "
                                                  r"of bad_window=50;"):
    take(pipeline.train_iterator(cfg, batch_size=5, seed=0), 20)
  for key, value in (("max_bad_fraction", 1.5), ("bad_window", 0)):
    with pytest.raises(ValueError, match=f"config.data.{key} must be"):
      pipeline.train_iterator(make_cfg("half_bad", tmp_path, **{key: value}), batch_size=5,
                              seed=0)


def test_corrupt_chunk_is_skipped_and_counted_by_file(corrupt_digits):
  data_dir, bad = corrupt_digits
  cfg = make_cfg("digits", data_dir, randaugment="")
  it = pipeline.train_iterator(cfg, batch_size=64, seed=3, with_index=True)
  batches = take(it, 23)  # 1472 good rows: one epoch and a bit
  assert all(b["image"].shape == (64, SIZE, SIZE, 3) for b in batches)
  indices = np.concatenate([b["index"] for b in batches])
  assert not bad & set(indices.tolist())
  assert sorted(indices[:1437 - len(bad)]) == sorted(set(range(1437)) - bad)
  stats = it.failures()
  assert stats["failed"] == stats["unreadable"] >= len(bad) and stats["undecodable"] == 0
  assert stats["by_file"] == {DIGITS_TRAIN_FILE: stats["failed"]}
  cfg.max_bad_fraction = 0.0  # the first failure raises
  with pytest.raises(pipeline.BadDataError) as e:
    take(pipeline.train_iterator(cfg, batch_size=64, seed=3), 23)
  msg, n = str(e.value), e.value.stats["failed"]  # those in the first batch with a failure
  assert n >= 1 and e.value.stats["seen"] % 64 == 0
  assert msg.startswith(f"digits split 'train': {n} of the last {e.value.stats['seen']} records "
                        f"read failed, more than config.data.max_bad_fraction=0 of ")
  assert f"{n} unreadable, 0 undecodable; by file: {DIGITS_TRAIN_FILE}: {n}; files in " in msg
  assert "cannot be read (RuntimeError: Corrupted Riegeli/records file" in msg


# ---------------------------------------------------------------------------------------------
# eval pipeline


def test_eval_shards_cover_the_split_once_with_padding(digits_dir):
  cfg = make_cfg("digits", digits_dir)
  source = pipeline.open_source(cfg, "validation")
  num_batches = pipeline.num_eval_batches(cfg, batch_size=50, process_count=3)
  assert num_batches == 3  # 360 / 3 = 120 per process -> 3 batches of 50
  seen = []
  for k in range(3):
    batches = list(pipeline.eval_iterator(cfg, batch_size=50, process_index=k, process_count=3,
                                          with_index=True))
    assert len(batches) == num_batches
    for batch in batches:
      assert batch["image"].shape == (50, SIZE, SIZE, 3) and batch["mask"].dtype == bool
      for row in np.flatnonzero(batch["mask"]):
        record = source[int(batch["index"][row])]
        assert batch["label"][row] == record["label"]
        np.testing.assert_array_equal(
            batch["image"][row], transforms.eval_transform(transforms.decode(record["image"]), cfg))
      assert (batch["index"][~batch["mask"]] == -1).all()
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 120 and not mask[120:].any()
    seen += np.concatenate([b["index"] for b in batches])[mask].tolist()
  assert sorted(seen) == list(range(360))


def test_eval_masks_corrupt_records_and_keeps_batch_count(folder, caplog):
  cfg = make_cfg(folder["name"], folder["data_dir"])
  source = pipeline.open_source(cfg, "validation")
  counts = []
  for k in range(2):
    with caplog.at_level(logging.WARNING):
      batches = list(pipeline.eval_iterator(cfg, batch_size=2, process_index=k, process_count=2,
                                            with_index=True))
    counts.append(len(batches))
    for batch in batches:
      names = [source[int(i)]["file_name"] if i >= 0 else b""
               for i in batch["index"]]
      for name, m, i in zip(names, batch["mask"], batch["index"]):
        assert m == (i >= 0 and b"bad" not in name)
  assert counts == [2, 2]  # 6 records -> 3 per process -> 2 batches of 2 each
  assert sum("does not decode" in r.getMessage() for r in caplog.records) == 1


def test_eval_masks_and_counts_unreadable_records(corrupt_digits):
  data_dir, bad = corrupt_digits
  cfg = make_cfg("digits", data_dir)
  it = pipeline.eval_iterator(cfg, batch_size=100, split="train", with_index=True)
  batches = list(it)
  assert len(batches) == pipeline.num_eval_batches(cfg, batch_size=100, split="train") == 15
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert set(index[(index >= 0) & ~mask].tolist()) == bad
  assert mask.sum() == 1437 - len(bad)
  assert it.failures() == dict(dataset="digits", split="train", seen=1437, failed=len(bad),
                               unreadable=len(bad), undecodable=0,
                               by_file={DIGITS_TRAIN_FILE: len(bad)})
  cfg.max_bad_fraction = 0.0
  with pytest.raises(pipeline.BadDataError, match=f"digits split 'train'.*{DIGITS_TRAIN_FILE}"):
    list(pipeline.eval_iterator(cfg, batch_size=100, split="train"))
