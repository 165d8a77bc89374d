"""Semantic segmentation's examples for pipeline.py's iterators (its `record` argument), from
records {"image": encoded, "segmentation": encoded label map (H, W, 1)}:

  train   {"image": uint8 (S, S, 3), "label": uint8 (S, S)}: segtransforms.train_transform
          (resize, crop, flip, photometric distortion, padding with the ignore label)
  eval    {"image": uint8 (Hc, Wc, 3): the image rescaled to fit cfg.seg_scale, padded to the
          canvas (multiples of cfg.eval_bucket); "label": uint8 (Lc, Lc'): the original labels,
          padded with the ignore label; "rows" (Lc, Hc/4), "cols" (Lc', Wc/4): the bilinear
          resize of the model's 1/4-resolution logits to the resized image, then to the
          original size (mmseg's two resizes, align_corners=False), as matrices over the valid
          region (zero over padding)}

A batch shares one canvas; so far the eval split's images must fall in one canvas per batch (a
dataset of one size, as the demo's; ADE20K's many sizes need its records grouped by canvas).
"""
import io

import numpy as np
from PIL import Image

from adaptor_jax.data import pipeline, segtransforms, transforms

STRIDE = 4  # the logits' resolution: 1/4 of the input (UperNet's)


def decode_labels(data, reduce_zero_label):
  """uint8 labels (H, W) of an encoded label map (segtransforms.labels applied)."""
  with Image.open(io.BytesIO(data)) as pil:
    return segtransforms.labels(np.asarray(pil), reduce_zero_label)


def _canvas(n, bucket):
  return -(-n // bucket) * bucket


class TrainRecord:
  """(stream position, record index) -> example; augmentation seeded by (seed, epoch, index)."""

  def __init__(self, source, cfg, seed, size):
    self._source, self._cfg, self._seed, self._size = source, cfg, seed, size
    s = cfg.image_size
    self._blank = (np.zeros((s, s, 3), np.uint8), np.full((s, s), segtransforms.IGNORE, np.uint8))

  def __call__(self, position, record_index):
    record_index = int(record_index)
    record, image, fail = pipeline.read_and_decode(self._source, record_index)
    if not fail:
      try:
        mask = decode_labels(record["segmentation"], self._cfg.reduce_zero_label)
      except OSError:
        fail = pipeline.UNDECODABLE
    if fail:
      image, mask = self._blank
    else:
      epoch = position // self._size
      rng = np.random.default_rng([int(self._seed) % 2**64, epoch, record_index])
      image, mask = segtransforms.train_transform(image, mask, rng, self._cfg)
    return dict(image=image, label=mask, index=np.int32(record_index), fail=np.int8(fail),
                real=np.bool_(True))


def resize_matrix(n_out, n_in):
  """(n_out, n_in): PyTorch's bilinear resize along one axis (align_corners=False) as a matrix."""
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = src - i0
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), i0), 1 - w1)
  np.add.at(m, (np.arange(n_out), i1), w1)
  return m


def logit_resize(original, resized, canvas):
  """(original, canvas // STRIDE): the logits of a canvas-padded input, resized as mmseg does:
  the valid ceil(resized / STRIDE) rows to the resized size, then to the original size."""
  valid = -(-resized // STRIDE)
  m = np.zeros((original, canvas // STRIDE), np.float32)
  m[:, :valid] = resize_matrix(original, resized) @ resize_matrix(resized, valid)
  return m


class EvalRecord:
  """Position j of process k's padded shard -> example (record k + j * K, or padding)."""

  def __init__(self, source, cfg, process_index, process_count):
    self._source, self._cfg = source, cfg
    self._process_index, self._process_count = process_index, process_count
    self._size = len(source)
    record, image, fail = pipeline.read_and_decode(source, process_index % max(self._size, 1))
    self._shape = None if fail else self._shapes(image)  # the canvas of this split's images

  def _shapes(self, image):
    """((Hc, Wc), (Lc, Lc')) of an image's canvas and its labels' canvas."""
    bucket = self._cfg.eval_bucket
    h, w = segtransforms.rescale_size(*image.shape[:2], self._cfg.seg_scale)
    return ((_canvas(h, bucket), _canvas(w, bucket)),
            (_canvas(image.shape[0], bucket), _canvas(image.shape[1], bucket)))

  def _blank(self, fail, index):
    (hc, wc), (lh, lw) = self._shape
    return dict(image=np.zeros((hc, wc, 3), np.uint8),
                label=np.full((lh, lw), segtransforms.IGNORE, np.uint8),
                rows=np.zeros((lh, hc // STRIDE), np.float32),
                cols=np.zeros((lw, wc // STRIDE), np.float32),
                index=np.int32(index), fail=np.int8(fail), real=np.bool_(index >= 0))

  def __call__(self, position):
    record_index = self._process_index + position * self._process_count
    if record_index >= self._size:  # padding of the last batch
      return self._blank(pipeline.OK, -1)
    record, image, fail = pipeline.read_and_decode(self._source, record_index)
    if not fail:
      try:
        mask = decode_labels(record["segmentation"], self._cfg.reduce_zero_label)
      except OSError:
        fail = pipeline.UNDECODABLE
    if fail:
      return self._blank(fail, record_index)
    if self._shapes(image) != self._shape:
      raise ValueError(f"{self._cfg.name}: record {record_index} needs canvas "
                       f"{self._shapes(image)}, the split's first {self._shape}: evaluating "
                       "images of several canvases is not supported yet")
    (hc, wc), (lh, lw) = self._shape
    resized = segtransforms.resize(image, self._cfg.seg_scale)
    h, w = resized.shape[:2]
    out = self._blank(fail, record_index)
    out["image"][:h, :w] = resized
    out["label"][:mask.shape[0], :mask.shape[1]] = mask
    out["rows"][:mask.shape[0]] = logit_resize(mask.shape[0], h, hc)
    out["cols"][:mask.shape[1]] = logit_resize(mask.shape[1], w, wc)
    return out
