"""The segmentation demo's dataset `seg_digits`: scikit-learn's handwritten digits (real scans, no
download) placed on canvases, one class per digit's ink and the background a class of its own.

Each 64x64 canvas holds two digits of the `digits` split it is drawn from (train canvases from
train digits, validation from validation), each upscaled 3x (nearest: 24x24) at a random
place; a digit's pixels of ink (any value above 0 of 16) take its class (1 + the digit),
the rest is background (0), and a later digit covers an earlier one. The image is the ink as gray (RGB
PNG), the label map a PNG. 1,000 train and 300 validation canvases from a fixed seed; class
names "background", "0".."9" in the dataset's metadata; built on first use like `digits`.
"""
import numpy as np
import tensorflow_datasets as tfds

from adaptor_jax.data import builders, writer

NAME, VERSION = "seg_digits", "1.0.0"
CANVAS, SCALE, PER_CANVAS, INK = 64, 3, 2, 1
COUNTS, SEED = {"train": 1000, "validation": 300}, 0
CLASS_NAMES = ["background"] + [str(d) for d in range(10)]


def canvases(split):
  """[(image uint8 (64, 64), labels uint8 (64, 64))] of a split, from the digits of that split."""
  images, labels, train_idx, val_idx = builders.digits_arrays()
  pool = train_idx if split == "train" else val_idx
  rng = np.random.default_rng([SEED, list(COUNTS).index(split)])
  side = 8 * SCALE
  out = []
  for _ in range(COUNTS[split]):
    image = np.zeros((CANVAS, CANVAS), np.uint8)
    mask = np.zeros((CANVAS, CANVAS), np.uint8)
    for i in rng.choice(pool, PER_CANVAS, replace=False):
      digit = np.kron(images[i], np.ones((SCALE, SCALE), np.uint8))  # 0..255
      ink = np.kron(images[i] >= INK * 16, np.ones((SCALE, SCALE), bool))
      top, left = rng.integers(0, CANVAS - side + 1, 2)
      window = (slice(top, top + side), slice(left, left + side))
      image[window] = np.where(ink, digit, image[window])
      mask[window] = np.where(ink, labels[i] + 1, mask[window])
    out.append((image, mask))
  return out


def build(data_dir=None):
  """Prepares `seg_digits` under `data_dir` unless it is there; returns a read-only builder."""
  tfds.display_progress_bar(False)
  try:
    return writer.build_once(NAME, VERSION, data_dir, False, _write)
  finally:
    tfds.display_progress_bar(True)


def _examples(split):
  for n, (image, mask) in enumerate(canvases(split)):
    yield n, {"image": writer.png(np.repeat(image[:, :, None], 3, axis=2)),
              "segmentation": writer.png(mask), "file_name": f"{split}_{n:04d}"}


def _write(data_dir):
  from adaptor_jax.data import ade20k  # noqa: PLC0415 - the same features
  writer.write(NAME, data_dir, ade20k.features(), {s: _examples(s) for s in COUNTS},
               "scikit-learn's handwritten digits on 64x64 canvases, a class per digit's ink.",
               VERSION, metadata=dict(class_names=CLASS_NAMES))
