"""The ADE20K builder (adaptor_jax/data/ade20k.py) on a tiny ADEChallengeData2016 archive in the
distributed layout (tests/dataset_archives.py): odd sizes, a grayscale image, an annotation of
"other" only, labels 0 and 150; from the zip and from the extracted folder, through the command
line; and the pairs it refuses, by name."""
import io
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import dataset_archives
from adaptor_jax.data import ade20k, transforms


def _records(builder, split):
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding(),
                                                   "segmentation": tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("folder", [False, True])
def test_built_from_the_archive_as_distributed(tmp_path, folder):
  source = tmp_path / ("ADEChallengeData2016" if folder else "ADEChallengeData2016.zip")
  made = dataset_archives.write_ade20k(tmp_path if folder else source,
                                       np.random.default_rng(0), folder=folder)
  done = subprocess.run([sys.executable, "-m", "adaptor_jax.data.builders", "--dataset=ade20k",
                         f"--source={tmp_path if folder else source}",
                         f"--data_dir={tmp_path / 'tfds'}"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == (
      f"ade20k in {tmp_path / 'tfds' / 'ade20k' / '1.0.0'}: 150 classes, "
      "{'train': 3, 'validation': 2}")
  builder = tfds.builder_from_directory(str(tmp_path / "tfds" / "ade20k" / "1.0.0"))
  names = builder.info.metadata["class_names"]
  assert names[:3] == ["wall", "building", "sky"] and names[-1] == "thing150" and len(names) == 150
  for split in ("train", "validation"):
    records = {r["file_name"].decode(): r for r in _records(builder, split)}
    assert sorted(records) == sorted(f"{stem}.jpg" for stem, _, _ in made[split])
    for stem, image, labels in made[split]:
      record = records[f"{stem}.jpg"]
      np.testing.assert_array_equal(transforms.decode(record["image"]), image)  # as distributed
      mask = np.asarray(Image.open(io.BytesIO(record["segmentation"])))
      np.testing.assert_array_equal(mask, labels)
  assert {int(m.max()) for _, _, m in made["train"]} == {0, 150}  # an all-"other" annotation


@pytest.mark.parametrize("broken,message", [
    ("unpaired", "1 train files without their image or annotation, e.g. ['ADE_train_00000001']"),
    ("size", "ADE_train_00000001.png is 53x36, its image 53x37"),
    ("label", "ADE_train_00000001.png has label 151 (above 150)"),
])
def test_a_bad_pair_is_refused_by_name(tmp_path, broken, message):
  source = tmp_path / "ADEChallengeData2016.zip"
  dataset_archives.write_ade20k(source, np.random.default_rng(1), break_pair=broken)
  with pytest.raises(ade20k.BuildError) as e:
    ade20k.build(source, tmp_path / "tfds")
  assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not (tmp_path / "tfds" / "ade20k" / "1.0.0").exists()
