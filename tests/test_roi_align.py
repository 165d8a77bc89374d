"""RoIAlign (adaptor_jax/models/roi_align.py) against NumPy oracles written with plain loops from
torchvision's CPU kernels (roi_align_kernel.cpp, roi_align_common.h): the forward for aligned
and not, sampling ratios 1-3, boxes partly or wholly outside the map, tiny, inverted and huge
boxes, non-square maps and outputs; the backward (the adjoint scatter of the same weights);
mmdetection's level assignment around its boundaries; the multilevel op against the oracle on
each box's level; jit / vmap over a batch; the shape checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptor_jax.models import roi_align as ra

f32 = np.float32
# Features are N(0, 1). XLA computes x / 3 as x * (1 / 3) (any division by a constant or by a
# broadcast scalar), so a sample coordinate may land an ulp or two from torchvision's (a few 1e-6
# of a map pixel at the test boxes' extents); times a bilinear slope of a few feature stds, the
# values move by up to ~4e-6 (the worst of 180 random cases).
ATOL = 1e-5


def _rng(seed):
  return np.random.default_rng(seed)


def np_taps(v, size):
  """torchvision's bilinear_interpolate along one axis: [(index, weight)], [] if outside."""
  if v < -1.0 or v > size:
    return []
  v = max(v, f32(0))
  low = int(v)
  if low >= size - 1:
    low = high = size - 1
    v = f32(low)
  else:
    high = low + 1
  frac = v - f32(low)
  return [(low, f32(1) - frac), (high, frac)]


def np_samples(roi, out_hw, scale, ratio, aligned, H, W):
  """For each bin (ph, pw): [(y, x, weight)] of its samples' corners, weights / ratio^2."""
  offset = f32(0.5) if aligned else f32(0)
  x1, y1, x2, y2 = (f32(c) * f32(scale) - offset for c in roi)
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = max(roi_w, f32(1)), max(roi_h, f32(1))
  out_h, out_w = out_hw
  bin_h, bin_w = roi_h / f32(out_h), roi_w / f32(out_w)
  bins = {}
  for ph in range(out_h):
    for pw in range(out_w):
      corners = []
      for iy in range(ratio):
        y = y1 + f32(ph) * bin_h + f32(iy + 0.5) * bin_h / f32(ratio)
        for ix in range(ratio):
          x = x1 + f32(pw) * bin_w + f32(ix + 0.5) * bin_w / f32(ratio)
          ty, tx = np_taps(y, H), np_taps(x, W)
          if ty and tx:
            corners += [(yi, xi, float(wy) * float(wx) / ratio ** 2)
                        for yi, wy in ty for xi, wx in tx]
      bins[ph, pw] = corners
  return bins


def np_roi_align(x_HWC, rois, out_hw, scale, ratio=2, aligned=True):
  H, W, C = x_HWC.shape
  out = np.zeros((len(rois), *out_hw, C))
  for k, roi in enumerate(rois):
    for (ph, pw), corners in np_samples(roi, out_hw, scale, ratio, aligned, H, W).items():
      for y, x, w in corners:
        out[k, ph, pw] += w * x_HWC[y, x].astype(np.float64)
  return out


def np_roi_align_grad(shape, rois, g_KhwC, out_hw, scale, ratio=2, aligned=True):
  """The adjoint: torchvision's backward kernel (each corner gets g * weight)."""
  grad = np.zeros(shape)
  for k, roi in enumerate(rois):
    for (ph, pw), corners in np_samples(roi, out_hw, scale, ratio, aligned, *shape[:2]).items():
      for y, x, w in corners:
        grad[y, x] += w * g_KhwC[k, ph, pw]
  return grad


def np_levels(rois, num_levels, finest_scale=56):
  """mmdetection's map_roi_levels in float32 as torch computes it (log2 correctly rounded)."""
  rois = rois.astype(f32)
  scale = np.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
  v = scale / f32(finest_scale) + f32(1e-6)
  level = np.floor(np.log2(v.astype(np.float64)).astype(f32))
  return np.clip(level, 0, num_levels - 1).astype(int)


def _boxes(rng, n, width, height):
  """Image-pixel boxes of every kind: inside, partly and wholly outside, tiny, inverted, huge."""
  x1 = rng.uniform(-0.3, 1.0, n) * width
  y1 = rng.uniform(-0.3, 1.0, n) * height
  random = np.stack([x1, y1, x1 + rng.uniform(0.5, 0.8 * width, n),
                     y1 + rng.uniform(0.5, 0.8 * height, n)], axis=1)
  special = [[0, 0, width, height],                          # the whole image
             [-3 * width, -2 * height, 4 * width, 3 * height],  # huge
             [1.3, 2.1, 1.6, 2.2], [5.0, 4.0, 5.0, 4.0],       # tiny, empty
             [6.0, 5.0, 2.0, 1.0],                              # inverted
             [-40.0, -30.0, -9.0, -3.0],                        # wholly outside, top left
             [width + 1.5, 2.0, width + 9.0, 7.0],              # wholly outside, right
             [width - 2.0, height - 3.0, width + 5.0, height + 4.0],  # over the far corner
             [-1.7, -1.1, 3.3, 2.9]]                            # over the near corner
  return np.concatenate([random, special]).astype(f32)


@pytest.mark.parametrize("aligned,ratio,shape,out_hw,scale", [
    (True, 2, (7, 11, 3), (3, 4), 0.5), (True, 1, (7, 11, 3), (3, 4), 0.5),
    (False, 2, (7, 11, 3), (3, 4), 0.5), (False, 1, (7, 11, 3), (3, 4), 0.5),
    (True, 3, (9, 5, 2), (2, 2), 0.25), (True, 2, (1, 6, 2), (2, 3), 1.0)])
def test_roi_align_is_torchvisions(aligned, ratio, shape, out_hw, scale):
  rng = _rng(0)
  x = rng.normal(size=shape).astype(f32)
  rois = _boxes(rng, 8, shape[1] / scale, shape[0] / scale)
  align = jax.jit(ra.roi_align, static_argnums=(2, 3, 4, 5))
  got = align(jnp.asarray(x), jnp.asarray(rois), out_hw, scale, ratio, aligned)
  assert got.shape == (len(rois), *out_hw, shape[2]) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np_roi_align(x, rois, out_hw, scale, ratio, aligned),
                             rtol=1e-5, atol=ATOL)


def test_gradient_is_torchvisions_backward_and_boxes_get_none():
  rng = _rng(1)
  x = rng.normal(size=(6, 9, 2)).astype(f32)
  rois = _boxes(rng, 6, 18.0, 12.0)
  g = rng.normal(size=(len(rois), 3, 2, 2)).astype(f32)
  f = jax.jit(lambda x, r: ra.roi_align(x, r, (3, 2), 0.5))
  out, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(rois))
  grad_x, grad_rois = vjp(jnp.asarray(g))
  np.testing.assert_allclose(np.asarray(grad_x), np_roi_align_grad(x.shape, rois, g, (3, 2), 0.5),
                             rtol=1e-5, atol=ATOL)
  assert not np.asarray(grad_rois).any()


def test_levels_are_mmdetections_around_the_boundaries():
  sides = [0.0, 8.0, 55.9, 56.0, 56.1, 111.99, 111.9999, 112.0, 112.01, 223.99, 224.0, 224.01,
           447.99, 448.0, 448.01, 600.0, 2000.0]
  squares = [[10.0, 20.0, 10.0 + s, 20.0 + s] for s in sides]
  oblong = [[0.0, 0.0, 50.0, 250.88], [3.0, 5.0, 3.0 + 784.0, 5.0 + 64.0],   # sqrt(wh) 112, 224
            [0.0, 0.0, 12.0, 1045.0], [5.0, 5.0, 1.0, 1.0]]                  # 111.98; inverted
  edges = [f32(t) for t in ra.level_thresholds(4)]   # the least float32 scales of levels 1-3
  edges += [np.nextafter(t, f32(0)) for t in edges]
  rois = jnp.asarray(np.asarray(squares + oblong + [[0, 0, e, e] for e in edges], f32))
  got = np.asarray(ra.map_roi_levels(rois, 4))
  np.testing.assert_array_equal(got, np_levels(np.asarray(rois), 4))
  np.testing.assert_array_equal(got, [0] * 7 + [1] * 3 + [2] * 3 + [3] * 4 + [1, 2, 0, 0] +
                                [1, 2, 3, 0, 1, 2])
  np.testing.assert_array_equal(np.asarray(ra.map_roi_levels(rois, 3)), np.minimum(got, 2))


def _pyramid(rng, strides, height, width, C):
  return [rng.normal(size=(height // s, width // s, C)).astype(f32) for s in strides]


def _pyramid_boxes(rng, n, height, width):
  """n boxes of 8 to 700 px, some outside the image, one of each level (sides 40 to 600 px) and
  3 padded (zero) ones."""
  side = np.exp(rng.uniform(np.log(8), np.log(700), (n, 2)))
  side = np.concatenate([side, np.repeat([[40.0], [150.0], [300.0], [600.0]], 2, axis=1)])
  x1 = rng.uniform(-0.2, 1.0, n + 4) * width
  y1 = rng.uniform(-0.2, 1.0, n + 4) * height
  boxes = np.stack([x1, y1, x1 + side[:, 0], y1 + side[:, 1]], axis=1)
  return np.concatenate([boxes, np.zeros((3, 4))]).astype(f32)


def test_multilevel_aligns_each_box_on_its_level():
  rng = _rng(2)
  strides = (4, 8, 16, 32)
  features = _pyramid(rng, strides, 64, 96, 3)
  rois = _pyramid_boxes(rng, 24, 64, 96)
  levels = np_levels(rois, 4)
  assert set(levels) == {0, 1, 2, 3}
  align = jax.jit(lambda f: ra.multilevel_roi_align(f, jnp.asarray(rois), 3, strides))
  out, vjp = jax.vjp(align, [jnp.asarray(f) for f in features])
  want = np.stack([np_roi_align(features[l], rois[k:k + 1], (3, 3), 1 / strides[l])[0]
                   for k, l in enumerate(levels)])
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=ATOL)
  padded = np.broadcast_to(features[0][0, 0], (3, 3, 3, 3))   # every sample clamped to (0, 0)
  np.testing.assert_array_equal(np.asarray(out[-3:]), padded)
  g = rng.normal(size=out.shape).astype(f32)
  for l, grad in enumerate(vjp(jnp.asarray(g))[0]):
    mine = levels == l
    np.testing.assert_allclose(
        np.asarray(grad), np_roi_align_grad(features[l].shape, rois[mine], g[mine], (3, 3),
                                            1 / strides[l]), rtol=1e-5, atol=ATOL)


def test_jit_and_vmap_over_a_batch():
  rng = _rng(3)
  strides = (8, 16)
  batch = [_pyramid(rng, strides, 48, 32, 2) for _ in range(2)]
  features = [np.stack([b[l] for b in batch]) for l in range(2)]
  rois = np.stack([_pyramid_boxes(rng, 5, 48, 32) for _ in range(2)])
  run = jax.jit(lambda f, r: ra.batch_multilevel_roi_align(f, r, (2, 3), strides=strides,
                                                           finest_scale=56))
  got = np.asarray(run([jnp.asarray(f) for f in features], jnp.asarray(rois)))
  assert got.shape == (2, 12, 2, 3, 2)
  one_image = jax.jit(lambda f, r: ra.multilevel_roi_align(f, r, (2, 3), strides))
  for b in range(2):
    one = one_image([jnp.asarray(f) for f in batch[b]], jnp.asarray(rois[b]))
    np.testing.assert_allclose(got[b], np.asarray(one), rtol=1e-6, atol=1e-6)
  single = jax.jit(jax.vmap(lambda f, r: ra.roi_align(f, r, 2, 1 / 8)))(
      jnp.asarray(features[0]), jnp.asarray(rois))
  for b in range(2):
    np.testing.assert_allclose(np.asarray(single[b]), np_roi_align(features[0][b], rois[b],
                                                                   (2, 2), 1 / 8),
                               rtol=1e-5, atol=ATOL)


def test_bfloat16_features_give_bfloat16():
  rng = _rng(4)
  x = rng.normal(size=(5, 6, 4)).astype(f32)
  rois = _boxes(rng, 4, 12.0, 10.0)
  got = jax.jit(ra.roi_align, static_argnums=(2, 3))(jnp.asarray(x, jnp.bfloat16),
                                                     jnp.asarray(rois), 2, 0.5)
  assert got.dtype == jnp.bfloat16
  want = np_roi_align(np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), rois, (2, 2),
                      0.5)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("call,match", [
    (lambda x, r: ra.roi_align(x[0], r, 2, 1.0), "features_HWC"),
    (lambda x, r: ra.roi_align(x, r[:, :3], 2, 1.0), "rois_K4"),
    (lambda x, r: ra.roi_align(x, r[None], 2, 1.0), "rois_K4"),
    (lambda x, r: ra.roi_align(x, r, 2, 1.0, sampling_ratio=0), "sampling_ratio"),
    (lambda x, r: ra.roi_align(x, r, (2, 0), 1.0), "output_size"),
    (lambda x, r: ra.roi_align(x, r, (2, 2, 2), 1.0), "output_size"),
    (lambda x, r: ra.multilevel_roi_align([x, x], r, 2), "features"),
    (lambda x, r: ra.multilevel_roi_align([x, x[..., :1]], r, 2, strides=(4, 8)), "features"),
])
def test_bad_arguments_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.zeros((4, 5, 2)), jnp.zeros((3, 4)))
