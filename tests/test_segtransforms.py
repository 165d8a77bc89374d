"""Segmentation's host transforms (adaptor_jax/data/segtransforms.py) against oracles written
from mmcv's, mmseg's and OpenCV's definitions (loops, the standard library's colorsys)."""
import colorsys

import numpy as np
import pytest

from adaptor_jax.data import segtransforms as st


def _rng(seed=0):
  return np.random.default_rng(seed)


def test_reduce_zero_label():
  mask = np.array([[0, 1, 150], [2, 0, 7]], np.uint8)
  np.testing.assert_array_equal(st.labels(mask), [[255, 0, 149], [1, 255, 6]])
  np.testing.assert_array_equal(st.labels(mask[..., None], reduce_zero_label=False), mask)


@pytest.mark.parametrize("size,scale,want", [
    ((512, 683), (2048, 512), (512, 683)),      # ADE20K's usual image: as it is
    ((375, 500), (2048, 512), (512, 683)),      # short side to 512
    ((300, 1500), (2048, 512), (410, 2048)),    # long side to 2048 first
    ((1000, 800), (1024, 256), (320, 256)),
])
def test_rescale_size_is_mmcvs(size, scale, want):
  assert st.rescale_size(*size, scale) == want


def np_bilinear(image, height, width):
  """Bilinear resizing by its definition, pixel by pixel, in float64: half-pixel centres,
  clamped, no antialiasing (cv2.INTER_LINEAR, and PyTorch's align_corners=False)."""
  H, W = image.shape[:2]
  out = np.zeros((height, width, image.shape[2]))
  for i in range(height):
    y = max((i + 0.5) * H / height - 0.5, 0.0)
    y0 = min(int(y), H - 1)
    y1, fy = min(y0 + 1, H - 1), y - y0
    for j in range(width):
      x = max((j + 0.5) * W / width - 0.5, 0.0)
      x0 = min(int(x), W - 1)
      x1, fx = min(x0 + 1, W - 1), x - x0
      out[i, j] = ((1 - fy) * ((1 - fx) * image[y0, x0] + fx * image[y0, x1])
                   + fy * ((1 - fx) * image[y1, x0] + fx * image[y1, x1]))
  return out


def np_linear(image, height, width):
  """cv2.INTER_LINEAR on uint8: np_bilinear rounded."""
  return np.clip(np.rint(np_bilinear(image, height, width)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(13, 17), (5, 4), (9, 9)])
def test_resizes_are_opencvs(size):
  image = _rng(1).integers(0, 256, (7, 11, 3), dtype=np.uint8)
  got = st.resize_bilinear(image, *size).astype(int)
  assert np.abs(got - np_linear(image, *size)).max() <= 1  # float32 vs float64 rounding
  assert (got != np_linear(image, *size)).mean() < 0.02
  mask = _rng(2).integers(0, 5, (7, 11), dtype=np.uint8)
  mask[2:4, 3:6] = st.IGNORE
  want = np.array([[mask[int(i * 7 / size[0]), int(j * 11 / size[1])] for j in range(size[1])]
                   for i in range(size[0])])
  np.testing.assert_array_equal(st.resize_nearest(mask, *size), want)  # ignore kept as it is


def _passes(m):
  counts = np.bincount(m[m != st.IGNORE].ravel(), minlength=2)
  return bool(counts.min() > 0 and counts.max() / counts.sum() < 0.75)


def test_random_crop_avoids_one_class_crops_and_keeps_pairs_aligned():
  """A crop is redrawn while one class has cat_max_ratio of its labelled pixels (ignored pixels
  aside); the image and the labels are cut by the same box; a smaller image is not cropped."""
  mask = np.zeros((40, 40), np.uint8)
  mask[24:, 24:] = 1  # crops holding enough of class 1 are the ones that pass
  mask[:5] = st.IGNORE
  rows, cols = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
  image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)  # where it came from
  passed = 0
  for seed in range(30):
    img, m = st.random_crop(image, mask, _rng(seed), 16)
    r, c = int(img[0, 0, 0]), int(img[0, 0, 1])
    assert img.shape == (16, 16, 3)
    np.testing.assert_array_equal(m, mask[r:r + 16, c:c + 16])
    passed += _passes(m)
  # 16% of the 25 x 25 boxes pass: 10 draws find one with probability 1 - 0.84^10 = 0.82,
  # one draw (the rule off) with 0.16
  assert passed >= 18, passed
  unchecked = sum(_passes(st.random_crop(image, mask, _rng(s), 16, cat_max_ratio=1.0)[1])
                  for s in range(30))
  assert unchecked <= 12, unchecked
  small = st.random_crop(image[:10, :12], mask[:10, :12], _rng(0), 16)
  assert small[0].shape == (10, 12, 3)


def test_hsv_is_opencvs_8bit_hsv():
  image = _rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
  hsv = st.rgb_to_hsv(image).astype(int)
  for (r, g, b), (h, s, v) in zip(image.reshape(-1, 3), hsv.reshape(-1, 3)):
    H, S, V = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    assert abs(h - round(H * 180) % 180) <= 1 and abs(s - round(S * 255)) <= 1
    assert v == round(V * 255)
  back = st.hsv_to_rgb(st.rgb_to_hsv(image)).astype(int)
  assert np.abs(back - image).max() <= 3  # 8-bit hue and saturation quantise


def test_photometric_distortion_changes_only_colours():
  image = _rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  outs = [st.photometric(image, _rng(s)) for s in range(8)]
  assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
  assert sum(not np.array_equal(o, image) for o in outs) >= 6  # each draw has 4 coins


def test_train_transform_pads_with_ignore():
  """A 30x40 image rescaled to fit (32, 32) x [1, 1], cropped to 32 and padded: the pad of the
  labels is IGNORE, of the image 0; ignore labels stay ignore."""
  class Cfg:
    seg_scale, seg_ratio, image_size, cat_max_ratio, hflip, photometric = (32, 32), (1, 1), \
        32, 0.75, 0.5, True
  image = _rng(5).integers(1, 256, (30, 40, 3), dtype=np.uint8)
  mask = _rng(6).integers(0, 3, (30, 40), dtype=np.uint8)
  mask[:3] = st.IGNORE
  img, m = st.train_transform(image, mask, _rng(7), Cfg)
  assert img.shape == (32, 32, 3) and m.shape == (32, 32)
  assert (m[24:] == st.IGNORE).all() and (img[24:] == 0).all()  # 30x40 -> 24x32, padded
  assert (m[:2] == st.IGNORE).all()
