"""The grain pipelines (adaptor_jax/data/pipeline.py): sources and their errors, batches against
the transforms applied to the stored records, sharding, determinism, iterator state (also
through orbax), worker processes, corrupt and undecodable records, eval padding and masks."""
import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

import dataset_archives
import data_cases
from data_cases import DIGITS_TRAIN_FILE, SIZE, make_cfg
from adaptor_jax import errors
from adaptor_jax.data import pipeline, transforms, writer

# the module-scoped datasets these tests share
digits_dir, folder, corrupt_digits = data_cases.digits_dir, data_cases.folder, data_cases.corrupt_digits


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
  fake = type("FakeImagenet", (writer._Builder,),  # pylint: disable=protected-access
              dict(name="imagenet2012", VERSION=tfds.core.Version("5.1.0"),
                   RELEASE_NOTES={"5.1.0": ""}), skip_registration=True)
  # pylint: disable=protected-access
  writer._prepare(fake(
      data_dir=tmp_path, file_format="array_record",
      features=writer.image_features([str(i) for i in range(1000)]),
      examples={"train": writer.file_examples(rows[:4]),
                "validation": writer.file_examples(rows[4:])}))
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
  examples = {s: writer.file_examples((f"{i:03d}.png", i % 2, data)
                                      for i, data in enumerate(rows))
              for s, rows in splits.items()}
  writer.write(name, str(data_dir), writer.image_features(["a", "b"]), examples, "")


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
