"""Semantic segmentation's examples for pipeline.py's iterators (its `record` argument), from
records {"image": encoded, "segmentation": encoded label map (H, W, 1)}:

  train   {"image": uint8 (S, S, 3), "label": uint8 (S, S)}: segtransforms.train_transform
          (resize, crop, flip, photometric distortion, padding with the ignore label)
  eval    {"views": [{"image": uint8 (Hc, Wc, 3), "rows": (Lc, Hc/4), "cols": (Lc', Wc/4)}],
          "label": uint8 (Lc, Lc')}: the original labels, padded with the ignore label; per
          view (view_sizes: one rescaled to fit cfg.seg_scale, or mmseg's multi-scale and flip
          test) the image resized (and flipped), padded to its canvas (multiples of
          cfg.eval_bucket), and the bilinear resize of the model's 1/4-resolution logits to the
          resized image, flipped back, then to the original size (mmseg's two resizes,
          align_corners=False) as matrices over the valid region (zero over padding)

Images of many sizes: a batch shares its canvases, so the eval split is grouped by the canvases
of its views (read from the image headers once per split and process); each group is shared
out over the processes and padded to whole batches, and its label canvas is the largest of its
members'. Every process yields the same sequence of batch shapes: one compiled eval step per
group. Padding is not neutral for the scans (they run over the padded canvas): eval_bucket=1
pads nothing (whole-image inference, as mmseg) at the cost of a compile per distinct size.
"""
import concurrent.futures
import io
import os

import numpy as np
from PIL import Image

from adaptor_jax.data import pipeline, segtransforms, transforms

STRIDE = 4  # the logits' resolution: ceil(1/4) of the input (UperNet's: two stride-2 convs)


def decode_labels(data, reduce_zero_label):
  """uint8 labels (H, W) of an encoded label map (segtransforms.labels applied)."""
  with Image.open(io.BytesIO(data)) as pil:
    return segtransforms.labels(np.asarray(pil), reduce_zero_label)


def _canvas(n, bucket):
  return -(-n // bucket) * bucket


def read_pair(source, record_index, cfg):
  """(image, labels, fail code) of a record; None, None and the code when it fails."""
  record, image, fail = pipeline.read_and_decode(source, record_index)
  if fail:
    return None, None, fail
  try:
    return image, decode_labels(record["segmentation"], cfg.reduce_zero_label), fail
  except OSError:
    return None, None, pipeline.UNDECODABLE


class TrainRecord:
  """(stream position, record index) -> example; augmentation seeded by (seed, epoch, index)."""

  def __init__(self, source, cfg, seed, size):
    self._source, self._cfg, self._seed, self._size = source, cfg, seed, size
    s = cfg.image_size
    self._blank = (np.zeros((s, s, 3), np.uint8), np.full((s, s), segtransforms.IGNORE, np.uint8))

  def __call__(self, position, record_index):
    record_index = int(record_index)
    image, mask, fail = read_pair(self._source, record_index, self._cfg)
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


def logit_resize(original, resized, canvas, flip=False):
  """(original, ceil(canvas / STRIDE)): the logits of a canvas-padded input, resized as mmseg does:
  the valid ceil(resized / STRIDE) rows to the resized size, flipped back when the input was
  flipped, then to the original size."""
  valid = -(-resized // STRIDE)
  back = resize_matrix(original, resized)
  m = np.zeros((original, -(-canvas // STRIDE)), np.float32)
  m[:, :valid] = (back[:, ::-1] if flip else back) @ resize_matrix(resized, valid)
  return m


def view_sizes(height, width, cfg):
  """[(height', width', flipped)] of the views an image is evaluated in: one rescaled to fit
  cfg.seg_scale (mmseg's test_pipeline), or one per ratio r of cfg.eval_ratios at r times the
  original size (its tta_pipeline: Resize(scale_factor=r, keep_ratio=True), i.e. mmcv's
  rescale to the scale (w r, h r) rounded); each also flipped when cfg.eval_flip."""
  if cfg.eval_ratios:
    sizes = [segtransforms.rescale_size(height, width, (int(width * r + 0.5),
                                                        int(height * r + 0.5)))
             for r in cfg.eval_ratios]
  else:
    sizes = [segtransforms.rescale_size(height, width, cfg.seg_scale)]
  flips = (False, True) if cfg.eval_flip else (False,)
  return [(h, w, flip) for h, w in sizes for flip in flips]


_SIZES = {}  # (dataset dir, split, records) -> [(H, W) or None]: read once per process


def _image_size(source, record_index):
  record, fail = pipeline.read_record(source, record_index)
  if fail:
    return None
  try:
    with Image.open(io.BytesIO(record["image"])) as pil:  # the header only
      return pil.height, pil.width
  except (OSError, ValueError):  # undecodable: counted when the record is read
    return None


def image_sizes(source):
  """(H, W) of every record's image from its header (None where unreadable), cached."""
  key = (os.fspath(source.dataset_info.data_dir), str(source.split), len(source))
  if key not in _SIZES:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:  # reads from a bucket wait
      _SIZES[key] = list(pool.map(lambda i: _image_size(source, i), range(len(source))))
  return _SIZES[key]


class EvalRecord:
  """Position j of process k's share -> example; its len() the share's positions. The split is
  grouped by canvases (module docstring); every process has the same groups and positions."""

  def __init__(self, source, cfg, process_index, process_count, batch_size):
    self._source, self._cfg = source, cfg
    bucket = cfg.eval_bucket
    groups = {}
    for index, size in enumerate(image_sizes(source)):
      key = None if size is None else tuple(
          (_canvas(h, bucket), _canvas(w, bucket)) for h, w, _ in view_sizes(*size, cfg))
      groups.setdefault(key, []).append((index, size))
    failed = groups.pop(None, [])
    if not groups:  # nothing readable: the failures in views of one bucket, to be counted
      groups[tuple(((bucket, bucket),) * len(view_sizes(1, 1, cfg)))] = []
    keys = sorted(groups)
    groups[keys[0]] += failed
    self._plan, self._shapes = [], {}
    for key in keys:
      members = groups[key]
      labels = [(_canvas(h, bucket), _canvas(w, bucket)) for _, (h, w) in
                ((i, s) for i, s in members if s is not None)] or [(bucket, bucket)]
      self._shapes[key] = (key, (max(h for h, _ in labels), max(w for _, w in labels)))
      mine = [i for i, _ in sorted(members)][process_index::process_count]
      share = pipeline.padded_share(len(members), process_count, batch_size)
      self._plan += [(key, i) for i in mine] + [(key, -1)] * (share - len(mine))
    self.canvases = len(keys)

  def __len__(self):
    return len(self._plan)

  def _blank(self, key, fail, index):
    canvases, (lh, lw) = self._shapes[key]
    views = [dict(image=np.zeros((hc, wc, 3), np.uint8),
                  rows=np.zeros((lh, -(-hc // STRIDE)), np.float32),
                  cols=np.zeros((lw, -(-wc // STRIDE)), np.float32)) for hc, wc in canvases]
    return dict(views=views, label=np.full((lh, lw), segtransforms.IGNORE, np.uint8),
                index=np.int32(index), fail=np.int8(fail), real=np.bool_(index >= 0))

  def __call__(self, position):
    key, record_index = self._plan[position]
    if record_index < 0:  # padding of the group's last batch
      return self._blank(key, pipeline.OK, -1)
    image, mask, fail = read_pair(self._source, record_index, self._cfg)
    if not fail and mask.shape != image.shape[:2]:  # the builder refuses these
      fail = pipeline.UNDECODABLE
    out = self._blank(key, fail, record_index)
    if fail:
      return out
    height, width = mask.shape
    out["label"][:height, :width] = mask
    for view, (h, w, flip), (hc, wc) in zip(out["views"], view_sizes(height, width, self._cfg),
                                            key):
      resized = segtransforms.resize_bilinear(image, h, w)
      view["image"][:h, :w] = resized[:, ::-1] if flip else resized
      view["rows"][:height] = logit_resize(height, h, hc)
      view["cols"][:width] = logit_resize(width, w, wc, flip)
    return out
