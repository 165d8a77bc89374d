"""The TFDS catalog datasets built from their distributed files (adaptor_jax/data/catalog.py):
cifar100, svhn_cropped and food101 read through TFDS' own registered builders (splits, labels,
ids, pixels, record order by key) and their one-line errors."""
import logging
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

import dataset_archives
from data_cases import make_cfg, records
from adaptor_jax.data import catalog, pipeline, transforms



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


class _Runs:
  """Unpickled, a call of os.system(command): what a hand-made archive can hide in a pickle."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


def test_a_cifar100_archive_that_would_run_code_is_refused(tmp_path):
  """A cifar-100-python.tar.gz whose meta pickle reduces to os.system: the builder's command
  line refuses it in one line naming the call, and the command never runs."""
  ran = tmp_path / "ran"
  archive = tmp_path / "cifar-100-python.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    dataset_archives.add_member(tar, "cifar-100-python/meta", pickle.dumps(
        {b"fine_label_names": _Runs(f"touch {ran}")}, protocol=2))
  done = subprocess.run([sys.executable, "-m", "adaptor_jax.data.builders", "--dataset=cifar100",
                         f"--source={archive}", f"--data_dir={tmp_path / 'tfds'}"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 1 and done.stderr.strip() == (
      f"adaptor_jax.data.builders: {archive}: cifar-100-python/meta is not a readable pickle (it "
      "calls posix.system, which CIFAR's pickles never do: refused, nothing was run)."), done.stderr
  assert not ran.exists()


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
