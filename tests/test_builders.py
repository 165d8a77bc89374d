"""Our dataset builders (adaptor_jax/data/builders.py): digits against sklearn, image folders
(explicit and random splits, original bytes, files that are not images) and their errors."""
import collections
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

import data_cases
from data_cases import make_cfg, records, write_folder
from adaptor_jax.data import builders, pipeline, transforms

# the module-scoped datasets these tests share
digits_dir, folder = data_cases.digits_dir, data_cases.folder



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
  info = json.loads((digits_dir / "digits" / "1.0.0" / "dataset_info.json").read_text())
  assert info["moduleName"] == "adaptor_jax.data.builders"
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


def test_files_to_build_from_must_be_local():
  """--root and --source name files on this machine (--data_dir may be a bucket): a URL there
  ends in one line, exit 2 (the command line)."""
  done = subprocess.run([sys.executable, "-m", "adaptor_jax.data.builders",
                         "--dataset=image_folder", "--root=gs://bkt/images", "--name=x"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 2 and done.stderr.strip() == (
      "adaptor_jax.data.builders: --root=gs://bkt/images: the files to build from must be on "
      "this machine's disk (copy them first, e.g. gcloud storage cp -r); --data_dir may be a "
      "bucket"), done.stderr
