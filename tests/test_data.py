"""Dataset builders and grain pipelines: sizes and pixels against sklearn and the source files,
batches against the transforms applied to the stored records, sharding, determinism, iterator
state (also through orbax), corrupt records and errors."""
import collections
import io
import logging
import os

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from sklearn import datasets as sk_datasets

from adaptor_jax.data import builders, pipeline, transforms

SIZE = 16  # output image side in these tests


def make_cfg(name, data_dir, **overrides):
  cfg = pipeline.default_data_config()
  cfg.name, cfg.data_dir, cfg.image_size, cfg.num_workers = name, str(data_dir), SIZE, 0
  cfg.update(overrides)
  return cfg


def image_bytes(rng, fmt, shape=(12, 10)):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def write_folder(root, counts, rng, corrupt=()):
  """root/<class>/<i>.{png,jpg} random images (counts: {class: n}); corrupt: extra bad .jpg's."""
  files = {}
  for c, n in counts.items():
    os.makedirs(root / c, exist_ok=True)
    for i in range(n):
      fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
      data = image_bytes(rng, fmt)
      (root / c / f"{i:03d}.{ext}").write_bytes(data)
      files[f"{c}/{i:03d}.{ext}"] = data
  for rel in corrupt:
    data = b"\xff\xd8\xff\xe0 not really a jpeg " + rng.bytes(64)
    (root / rel).write_bytes(data)
    files[rel] = data
  return files


def records(cfg, split):
  source = pipeline.open_source(cfg, split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  builders.build_digits(data_dir)
  return data_dir


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
  builders.build_image_folder(root, base / "tfds", "tiny_folder")
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
    assert set(got) == set(folder[split])  # notes.txt skipped, corrupt images kept
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
  with pytest.raises(ValueError, match="reserved"):
    builders.build_image_folder(tmp_path / "empty", tmp_path / "tfds", "digits")
  with pytest.raises(ValueError, match="snake_case"):
    builders.build_image_folder(tmp_path / "empty", tmp_path / "tfds", "My Data")


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
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  rows = [(f"n{i:08d}_{i}.JPEG", 100 * i, image_bytes(rng, "JPEG")) for i in range(6)]
  fake = type("FakeImagenet", (builders._Builder,),  # pylint: disable=protected-access
              dict(name="imagenet2012", VERSION=tfds.core.Version("5.1.0"),
                   RELEASE_NOTES={"5.1.0": ""}), skip_registration=True)
  builders._prepare(fake(  # pylint: disable=protected-access
      data_dir=tmp_path, file_format="array_record", class_names=[str(i) for i in range(1000)],
      examples={"train": rows[:4], "validation": rows[4:]}))
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
    batches = take(pipeline.train_iterator(cfg, batch_size=4, seed=0, with_index=True), 12)
  indices = np.concatenate([b["index"] for b in batches])  # 48 = two epochs of 24 good ones
  assert all(b["image"].shape == (4, SIZE, SIZE, 3) for b in batches)
  assert not bad & set(indices.tolist())
  assert sorted(indices[:24]) == sorted(set(range(len(source))) - bad)
  warnings = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
  assert len(warnings) >= 4  # each corrupt record once per epoch, over two epochs
  assert warnings[-1].endswith(f"({len(warnings)} skipped so far).")
  assert {int(w.split()[2]) for w in warnings} == bad


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
