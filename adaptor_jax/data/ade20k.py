r"""ADE20K-150 (the SceneParsing benchmark of MIT's ADEChallengeData2016) as a TFDS ArrayRecord
dataset `ade20k`, built from the file its site distributes, without TensorFlow:

  python -m adaptor_jax.data.builders --dataset=ade20k --source=ADEChallengeData2016.zip \
      --data_dir=DIR            # or --source=the extracted ADEChallengeData2016 folder

The archive holds images/{training,validation}/ADE_*.jpg, annotations/{training,validation}/
ADE_*.png (one 8-bit label per pixel: 0 is "other", ignored by the benchmark; 1..150 the
classes) and objectInfo150.txt (the classes: index, ratio, counts, then names separated by ';').
Splits train (20,210 images) and validation (2,000). Features: image (the JPEG as
distributed), segmentation (the PNG as distributed, (H, W, 1)), file_name; the 150 class names
(the first name of each, as mmsegmentation's ADE20KDataset) in the dataset's metadata
(`builder.info.metadata["class_names"]`). Every image and annotation is decoded once while the
dataset is built: an image without its annotation (or the reverse), one that does not decode,
a pair of different sizes or a label above 150 stops the build, naming the files.

(TFDS' own `scene_parse150` is not this benchmark's data: it is the 2017 challenge's instance
data, 100 thing classes, and needs TensorFlow to build.)
"""
import io
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from adaptor_jax.data import transforms, writer
from adaptor_jax.data.writer import BuildError, SourceMissing

NAME, VERSION = "ade20k", "1.0.0"
NUM_CLASSES = 150  # label 0 is "other": ignored (mmseg's reduce_zero_label)
ROOT = "ADEChallengeData2016"
SPLITS = {"train": "training", "validation": "validation"}
SOURCE = ("ADEChallengeData2016.zip (SceneParsing, 923 MB)",
          "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
          "PATH/ADEChallengeData2016.zip")
_BAD_NAMED = 5


class _Source:
  """The archive's files by their path under ADEChallengeData2016/, from the zip or the folder."""

  def __init__(self, source):
    source = os.path.expanduser(os.fspath(source))
    self.name = source
    if os.path.isdir(source):
      root = os.path.join(source, ROOT) if os.path.isdir(os.path.join(source, ROOT)) else source
      self._zip, self._root = None, root
      self.paths = sorted(os.path.relpath(os.path.join(d, f), root)
                          for d, _, files in os.walk(root) for f in files)
    elif os.path.isfile(source):
      try:
        self._zip = zipfile.ZipFile(source)
      except zipfile.BadZipFile as e:
        raise BuildError(f"{source}: not a readable zip archive ({e}).") from None
      prefix = ROOT + "/"
      self.paths = sorted(n[len(prefix):] for n in self._zip.namelist()
                          if n.startswith(prefix) and not n.endswith("/"))
    else:
      raise SourceMissing(f"ADE20K archive or folder {source!r} does not exist.")
    if "objectInfo150.txt" not in self.paths:
      raise BuildError(f"{source}: no {ROOT}/objectInfo150.txt (is it ADEChallengeData2016?).")

  def read(self, path):
    if self._zip is not None:
      return self._zip.read(f"{ROOT}/{path}")
    with open(os.path.join(self._root, path), "rb") as f:
      return f.read()


def class_names(text):
  """The 150 class names of objectInfo150.txt, in index order (each line's first name)."""
  rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
  names = {int(r[0]): r[-1].split(";")[0].strip() for r in rows}
  if sorted(names) != list(range(1, NUM_CLASSES + 1)):
    raise BuildError(f"objectInfo150.txt lists classes {sorted(names)[:3]}...; ADE20K-150 has "
                     "1..150.")
  return [names[i] for i in range(1, NUM_CLASSES + 1)]


def _pairs(source, split):
  """[(stem, image path, annotation path)] of a split; BuildError naming unpaired files."""
  folder = SPLITS[split]
  images = {os.path.splitext(os.path.basename(p))[0]: p for p in source.paths
            if p.startswith(f"images/{folder}/") and p.lower().endswith(".jpg")}
  masks = {os.path.splitext(os.path.basename(p))[0]: p for p in source.paths
           if p.startswith(f"annotations/{folder}/") and p.lower().endswith(".png")}
  unpaired = sorted(set(images) ^ set(masks))
  if unpaired:
    raise BuildError(f"{source.name}: {len(unpaired)} {split} files without their image or "
                     f"annotation, e.g. {unpaired[:_BAD_NAMED]}.")
  if not images:
    raise BuildError(f"{source.name}: no images/{folder}/*.jpg.")
  return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def _check(source, stem, image_bytes, mask_bytes):
  """Why the pair is unusable, or None (decodes both, same size, labels 0..150)."""
  try:
    image = transforms.decode(image_bytes)
  except ValueError as e:
    return f"{stem}.jpg does not decode ({e})"
  try:
    with Image.open(io.BytesIO(mask_bytes)) as pil:
      mask = np.asarray(pil)
  except OSError as e:
    return f"{stem}.png does not decode ({e})"
  if mask.ndim != 2 or mask.dtype != np.uint8:
    return f"{stem}.png is {mask.dtype} {mask.shape}, not one 8-bit label per pixel"
  if mask.shape != image.shape[:2]:
    return f"{stem}.png is {mask.shape[1]}x{mask.shape[0]}, its image {image.shape[1]}x" \
           f"{image.shape[0]}"
  if mask.max(initial=0) > NUM_CLASSES:
    return f"{stem}.png has label {mask.max()} (above {NUM_CLASSES})"
  return None


def features():
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "segmentation": tfds.features.Image(shape=(None, None, 1), use_colormap=False),
      "file_name": tfds.features.Text(),
  })


def _examples(source, pairs):
  for stem, image_path, mask_path in pairs:
    yield stem, {"image": source.read(image_path), "segmentation": source.read(mask_path),
                 "file_name": os.path.basename(image_path)}


def build(source, data_dir=None, overwrite=False):
  """Prepares `ade20k` in `data_dir` from ADEChallengeData2016.zip or its folder; returns a
  read-only builder. A build is reused unless `overwrite`."""
  return writer.build_once(NAME, VERSION, data_dir, overwrite, _write, source)


def _write(data_dir, source):
  source = _Source(source)
  names = class_names(source.read("objectInfo150.txt").decode("utf-8"))
  splits = {split: _pairs(source, split) for split in SPLITS}
  bad = [why for pairs in splits.values() for stem, i, m in pairs
         if (why := _check(source, stem, source.read(i), source.read(m)))]
  if bad:
    raise BuildError(f"{source.name}: {len(bad)} unusable image/annotation pairs: "
                     + "; ".join(bad[:_BAD_NAMED]) + ("; ..." if len(bad) > _BAD_NAMED else ""))
  writer.write(NAME, data_dir, features(),
               {split: _examples(source, pairs) for split, pairs in splits.items()},
               f"ADE20K-150 (SceneParsing) from {source.name}.", VERSION,
               metadata=dict(class_names=names))
