"""Host transforms of semantic segmentation: mmsegmentation's ADE20K pipeline, one image and its
label map (H, W) at a time, in NumPy, drawing from a numpy Generator.

  train   labels(): reduce_zero_label (0 -> ignore, 1..N -> 0..N-1);
          random_resize(): rescale to fit cfg.seg_scale times U(cfg.seg_ratio), keeping the
          ratio (image bilinear, labels nearest); random_crop(): cfg.image_size square, retried
          up to 10 times while one class covers cat_max_ratio of its labelled pixels or fewer
          than two classes show; hflip; photometric(): PhotoMetricDistortion; pad(): to the crop
          size (image 0, labels ignore)
  eval    resize(): rescale to fit cfg.seg_scale keeping the ratio (the labels are not resized:
          metrics are taken at the original size)

Matched to mmcv / mmseg (mmcv.imrescale, RandomResize, RandomCrop, RandomFlip,
PhotoMetricDistortion, SegDataPreProcessor's padding) by their definitions; where they call
OpenCV we compute what OpenCV computes, in floating point: bilinear resizing with half-pixel
centres and no antialiasing (cv2.INTER_LINEAR; OpenCV's 11-bit fixed-point weights can differ
from ours by 1 in a pixel), nearest neighbour as cv2.INTER_NEAREST (source floor(x * in / out),
not half-pixel), and 8-bit HSV as cv2.cvtColor (hue in 0..179, rounded).
"""
import numpy as np

IGNORE = 255


def labels(mask, reduce_zero_label=True):
  """uint8 labels of a decoded annotation (H, W) or (H, W, 1): with reduce_zero_label, 0 (the
  unlabelled "other") becomes IGNORE and 1..N become 0..N-1, as mmseg's LoadAnnotations."""
  mask = np.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., 0]
  if not reduce_zero_label:
    return mask.astype(np.uint8)
  out = mask.astype(np.int32) - 1
  out[mask == 0] = IGNORE
  return out.astype(np.uint8)


def rescale_size(height, width, scale):
  """mmcv.rescale_size: (height', width') fitting `scale` (long edge, short edge) keeping the
  ratio: the factor min(long / max(h, w), short / min(h, w)), sizes rounded half up."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def _linear_taps(n_in, n_out):
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)


def resize_bilinear(image, height, width):
  """uint8 (H, W, C) -> (height, width, C), as cv2.resize INTER_LINEAR (rounded to nearest)."""
  if image.shape[:2] == (height, width):
    return image
  h0, h1, wh = _linear_taps(image.shape[0], height)
  w0, w1, ww = _linear_taps(image.shape[1], width)
  x = image.astype(np.float32)
  rows = x[h0] * (1 - wh)[:, None, None] + x[h1] * wh[:, None, None]
  out = rows[:, w0] * (1 - ww)[None, :, None] + rows[:, w1] * ww[None, :, None]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_nearest(mask, height, width):
  """(H, W) -> (height, width), as cv2.resize INTER_NEAREST: source index floor(i * in / out)."""
  if mask.shape[:2] == (height, width):
    return mask
  rows = np.minimum((np.arange(height) * (mask.shape[0] / height)).astype(np.int64),
                    mask.shape[0] - 1)
  cols = np.minimum((np.arange(width) * (mask.shape[1] / width)).astype(np.int64),
                    mask.shape[1] - 1)
  return mask[rows][:, cols]


def resize(image, scale):
  """Eval: the image rescaled to fit `scale` (long, short) keeping the ratio."""
  return resize_bilinear(image, *rescale_size(*image.shape[:2], scale))


def random_resize(image, mask, rng, scale, ratio_range):
  """RandomResize: `scale` times a ratio drawn from U(ratio_range), then rescaled keeping the
  ratio; the image bilinear, the labels nearest."""
  ratio = rng.uniform(*ratio_range)
  height, width = rescale_size(*image.shape[:2], (int(scale[0] * ratio), int(scale[1] * ratio)))
  return resize_bilinear(image, height, width), resize_nearest(mask, height, width)


def random_crop(image, mask, rng, size, cat_max_ratio=0.75, tries=10):
  """RandomCrop to at most size x size: offsets uniform over the margins; while the crop's
  labelled pixels hold fewer than two classes or one class has cat_max_ratio of them, another
  crop (10 tries; the last is kept)."""
  margin_h, margin_w = max(image.shape[0] - size, 0), max(image.shape[1] - size, 0)

  def draw():
    top, left = rng.integers(0, margin_h + 1), rng.integers(0, margin_w + 1)
    return slice(top, top + size), slice(left, left + size)

  box = draw()
  if cat_max_ratio < 1:
    for _ in range(tries):
      counts = np.bincount(mask[box].ravel(), minlength=256)[:IGNORE]
      counts = counts[counts > 0]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      box = draw()
  return image[box], mask[box]


def hflip(image, mask, rng, p=0.5):
  if rng.random() < p:
    return image[:, ::-1], mask[:, ::-1]
  return image, mask


def _convert(x, alpha=1.0, beta=0.0):
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv(image):
  """uint8 RGB -> uint8 HSV as OpenCV's 8-bit conversion: H in 0..179 (degrees / 2), S, V in
  0..255, each rounded."""
  x = image.astype(np.float32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = x.max(-1)
  diff = v - x.min(-1)
  s = np.where(v > 0, diff * 255.0 / np.maximum(v, 1), 0)
  safe = np.maximum(diff, 1e-6)
  h = np.where(v == r, 60 * (g - b) / safe,
               np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
  h = np.where(diff == 0, 0, np.where(h < 0, h + 360, h))
  return np.stack([np.rint(h / 2) % 180, np.rint(s), v], -1).astype(np.uint8)


def hsv_to_rgb(hsv):
  """uint8 HSV (OpenCV's 8-bit ranges) -> uint8 RGB, rounded."""
  h = hsv[..., 0].astype(np.float32) * 2 / 60
  s, v = hsv[..., 1].astype(np.float32) / 255, hsv[..., 2].astype(np.float32)
  sector = np.floor(h).astype(np.int64) % 6
  f = h - np.floor(h)
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
  rgb = np.zeros(hsv.shape, np.float32)
  for k, channels in enumerate(choices):
    rgb[sector == k] = np.stack(channels, -1)[sector == k]
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def photometric(image, rng, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
  """mmseg's PhotoMetricDistortion: brightness (+U(-32, 32)), contrast (xU(0.5, 1.5)) before
  or after saturation (S xU(0.5, 1.5)) and hue (H + randint(-18, 18) mod 180), each with
  probability 1/2, uint8 clipping after each."""
  if rng.integers(2):
    image = _convert(image, beta=rng.uniform(-brightness, brightness))
  contrast_first = rng.integers(2)
  if contrast_first and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(*contrast))
  if rng.integers(2):
    hsv = rgb_to_hsv(image)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation))
    image = hsv_to_rgb(hsv)
  if rng.integers(2):
    hsv = rgb_to_hsv(image)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue, hue + 1)) % 180
    image = hsv_to_rgb(hsv)
  if not contrast_first and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(*contrast))
  return image


def pad(image, mask, size):
  """Bottom / right padding to size x size: the image with 0, the labels with IGNORE."""
  h, w = mask.shape
  image = np.pad(image, [(0, size - h), (0, size - w), (0, 0)])
  mask = np.pad(mask, [(0, size - h), (0, size - w)], constant_values=IGNORE)
  return image, mask


def train_transform(image, mask, rng, cfg):
  """(uint8 (S, S, 3), uint8 labels (S, S)) of a decoded image and its labels (already through
  labels()), S = cfg.image_size."""
  image, mask = random_resize(image, mask, rng, cfg.seg_scale, cfg.seg_ratio)
  image, mask = random_crop(image, mask, rng, cfg.image_size, cfg.cat_max_ratio)
  image, mask = hflip(image, mask, rng, cfg.hflip)
  if cfg.photometric:
    image = photometric(image, rng)
  return pad(np.ascontiguousarray(image), np.ascontiguousarray(mask), cfg.image_size)
