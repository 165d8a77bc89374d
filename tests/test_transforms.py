"""Image transforms (host, numpy/PIL) and batch augmentation (device, JAX) against direct oracles."""
import functools
import io
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from adaptor_jax.data import augment as A
from adaptor_jax.data import transforms as T


def _image(seed, h, w):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth_image(seed, h, w):
  """A low-frequency image (JPEG compresses it well; DCT downscaling stays close to a resize)."""
  r = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  chans = [127 + 100 * np.sin(r.uniform(1, 6) * xx + r.uniform(1, 6) * yy + r.uniform(0, 6))
           for _ in range(3)]
  return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, fmt, **kw)
  return buf.getvalue()


def _pil_decode(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------------------------------------
# decode


def test_decode_png_exact_and_gray_and_rgba():
  img = _image(0, 37, 45)
  out = T.decode(_encode(img, "PNG"))
  assert out.dtype == np.uint8 and np.array_equal(out, img)
  assert np.array_equal(T.decode(np.frombuffer(_encode(img, "PNG"), np.uint8)), img)
  gray = img[..., 0]
  out = T.decode(_encode(gray, "PNG"))
  assert out.shape == (37, 45, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
  rgba = np.concatenate([img, img[..., :1]], -1)
  assert np.array_equal(T.decode(_encode(rgba, "PNG")), img)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_jpeg_matches_pil(mode):
  img = _smooth_image(1, 48, 64)
  buf = io.BytesIO()
  Image.fromarray(img).convert(mode).save(buf, "JPEG", quality=90)  # CMYK: through PIL
  data = buf.getvalue()
  out = T.decode(data)
  ref = _pil_decode(data)
  assert out.shape == (48, 64, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - ref).mean() <= 1.0
  if mode == "RGB":
    assert np.abs(out.astype(int) - img).mean() < 3  # and close to the source


def test_decode_jpeg_min_size_downscales_by_two():
  img = _smooth_image(2, 96, 128)
  data = _encode(img, "JPEG", quality=95)
  out = T.decode(data, min_size=40)  # 1/2 keeps both sides >= 40; 1/4 would not
  assert out.shape == (48, 64, 3)
  ref = np.asarray(Image.fromarray(_pil_decode(data)).resize((64, 48), Image.Resampling.BOX))
  assert np.abs(out.astype(int) - ref).mean() < 2
  assert T.decode(data, min_size=60).shape == (96, 128, 3)  # 1/2 would give 48 < 60


@pytest.mark.parametrize("data", [b"", b"garbage bytes, not an image", b"\xff\xd8\xff\xe0" + b"x" * 50])
def test_decode_garbage_raises(data):
  with pytest.raises(ValueError, match="decode"):
    T.decode(data)


def test_decode_truncated_jpeg_raises():
  data = _encode(_image(3, 40, 40), "JPEG")
  with pytest.raises(ValueError):
    T.decode(data[:len(data) // 2])


# ------------------------------------------------------------------------------------------------
# random_resized_crop, hflip, resize_center_crop


def test_random_resized_crop_full_square_is_plain_resize():
  img = _image(4, 50, 50)
  out = T.random_resized_crop(img, np.random.default_rng(0), 24, scale=(1, 1), ratio=(1, 1))
  ref = np.asarray(Image.fromarray(img).resize((24, 24), Image.Resampling.BICUBIC))
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8 and np.array_equal(out, ref)


def test_random_resized_crop_is_crop_then_resize_of_its_params():
  img = _image(5, 41, 57)
  for seed in range(5):
    out = T.random_resized_crop(img, np.random.default_rng(seed), 20, interpolation="bilinear")
    top, left, h, w = T.random_resized_crop_params(41, 57, np.random.default_rng(seed))
    crop = Image.fromarray(np.ascontiguousarray(img[top:top + h, left:left + w]))
    ref = np.asarray(crop.resize((20, 20), Image.Resampling.BILINEAR))
    assert np.array_equal(out, ref)


def test_random_resized_crop_params_distribution():
  rng = np.random.default_rng(6)
  H, W, scale, ratio = 90, 120, (0.08, 1.0), (3 / 4, 4 / 3)
  areas = []
  for _ in range(400):
    top, left, h, w = T.random_resized_crop_params(H, W, rng, scale, ratio)
    assert 0 <= top and top + h <= H and 0 <= left and left + w <= W and h > 0 and w > 0
    # sides are rounded from sqrt(area * r), sqrt(area / r): undo the rounding slack
    assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]
    assert (h - 0.5) * (w - 0.5) <= H * W and (h + 0.5) * (w + 0.5) >= 0.08 * H * W
    areas.append(h * w / (H * W))
  # most draws fit at the first try: area fraction ~ U(0.08, 1) (mean 0.54), biased a bit low
  assert 0.42 < np.mean(areas) < 0.58


def test_random_resized_crop_fallback_is_center_crop_at_ratio_bound():
  img = _image(7, 30, 50)  # aspect 5/3 > 4/3, and scale 2 never fits: fallback
  out = T.random_resized_crop(img, np.random.default_rng(0), 16, scale=(2, 2), ratio=(1, 4 / 3))
  ref = np.asarray(Image.fromarray(np.ascontiguousarray(img[:, 5:45])).resize(
      (16, 16), Image.Resampling.BICUBIC))  # w = round(30 * 4/3) = 40, left (50 - 40) // 2
  assert np.array_equal(out, ref)


def test_random_resized_crop_seeded():
  img = _image(8, 40, 40)
  a = T.random_resized_crop(img, np.random.default_rng(1), 16)
  assert np.array_equal(a, T.random_resized_crop(img, np.random.default_rng(1), 16))
  assert not np.array_equal(a, T.random_resized_crop(img, np.random.default_rng(2), 16))
  with pytest.raises(ValueError, match="scale"):
    T.random_resized_crop(img, np.random.default_rng(1), 16, scale=(0.5, 0.1))
  with pytest.raises(ValueError, match="interpolation"):
    T.random_resized_crop(img, np.random.default_rng(1), 16, interpolation="cubic")
  with pytest.raises(ValueError, match="uint8"):
    T.random_resized_crop(img.astype(np.float32), np.random.default_rng(1), 16)


def test_hflip():
  img = _image(9, 10, 12)
  assert np.array_equal(T.hflip(img, np.random.default_rng(0), 1.0), img[:, ::-1])
  assert np.array_equal(T.hflip(img, np.random.default_rng(0), 0.0), img)
  rng = np.random.default_rng(1)
  flips = sum(not np.array_equal(T.hflip(img, rng, 0.3), img) for _ in range(1000))
  assert 240 < flips < 360


@pytest.mark.parametrize("h,w", [(30, 50), (50, 30), (21, 21)])
def test_resize_center_crop(h, w):
  img = _image(10, h, w)
  out = T.resize_center_crop(img, 16, crop_pct=0.5)
  # shorter side -> floor(16 / 0.5) = 32, longer int(32 * long / short); centre crop 16
  short, long = min(h, w), max(h, w)
  new_h, new_w = (32, int(32 * long / short)) if h <= w else (int(32 * long / short), 32)
  resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.BICUBIC))
  top, left = int(round((new_h - 16) / 2)), int(round((new_w - 16) / 2))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  assert np.array_equal(out, resized[top:top + 16, left:left + 16])
  if (h, w) == (30, 50):
    assert (new_w, left) == (53, 18)  # round(18.5) = 18: torchvision's CenterCrop rounding


def test_eval_transform_224():
  img = _smooth_image(11, 300, 400)
  cfg = types.SimpleNamespace(image_size=224, crop_pct=0.875, interpolation="bicubic")
  out = T.eval_transform(img, cfg)
  resized = np.asarray(Image.fromarray(img).resize((341, 256), Image.Resampling.BICUBIC))
  assert np.array_equal(out, resized[16:240, 58:282])


# ------------------------------------------------------------------------------------------------
# RandAugment


def test_parse_rand_augment():
  spec = T.parse_rand_augment("rand-m9-mstd0.5-inc1")
  assert (spec.magnitude, spec.magnitude_std, spec.num_layers, spec.prob) == (9, 0.5, 2, 0.5)
  assert spec.ops == T.RAND_INCREASING_TRANSFORMS and len(spec.ops) == 15
  spec = T.parse_rand_augment("rand-n3-m7-p0.9-mmax12-mstd101")
  assert (spec.num_layers, spec.magnitude, spec.prob, spec.magnitude_max) == (3, 7, 0.9, 12)
  assert spec.magnitude_std == math.inf and spec.ops == T.RAND_TRANSFORMS
  with pytest.raises(ValueError, match="'x'"):
    T.parse_rand_augment("rand-m9-x3")
  for bad in ("augmix-m9", "rand-m", "rand-mstdfoo", "rand-n-1"):
    with pytest.raises(ValueError):
      T.parse_rand_augment(bad)


def test_level_args():
  assert T.level_args("Rotate", 9) == pytest.approx((27.0,))
  assert T.level_args("Rotate", 9, negate=True) == pytest.approx((-27.0,))
  assert T.level_args("ShearY", 9, True) == pytest.approx((-0.27,))
  assert T.level_args("TranslateXRel", 9) == pytest.approx((0.405,))
  assert T.level_args("PosterizeIncreasing", 9) == (1,)
  assert T.level_args("PosterizeIncreasing", 0) == (4,)
  assert T.level_args("Posterize", 9) == (3,)
  assert T.level_args("SolarizeIncreasing", 9) == (26,)  # 256 - int(0.9 * 256)
  assert T.level_args("Solarize", 9) == (230,)
  assert T.level_args("SolarizeAdd", 9) == (99,)
  assert T.level_args("ColorIncreasing", 9) == pytest.approx((1.81,))
  assert T.level_args("ContrastIncreasing", 10, True) == pytest.approx((0.1,))
  assert T.level_args("Sharpness", 5) == pytest.approx((1.0,))
  assert T.level_args("Invert", 5, True) == ()


def test_ops_against_numpy():
  x = _image(12, 40, 40)
  op = lambda name, m, neg=False: T.apply_op(x, name, *T.level_args(name, m, neg))
  assert np.array_equal(op("Invert", 9), 255 - x)
  assert np.array_equal(op("SolarizeIncreasing", 9), np.where(x >= 26, 255 - x, x))
  assert np.array_equal(op("SolarizeIncreasing", 0), x)  # threshold 256: nothing inverted
  assert np.array_equal(op("PosterizeIncreasing", 9), x & 0b10000000)
  assert np.array_equal(op("Posterize", 7), x & 0b11000000)  # int(0.7 * 4) = 2 bits kept
  assert not op("PosterizeIncreasing", 10).any()  # 0 bits kept: black
  assert np.array_equal(op("SolarizeAdd", 9), np.where(x < 128, np.minimum(x + 99, 255), x))
  factor = T.level_args("BrightnessIncreasing", 5, True)[0]
  assert np.abs(op("BrightnessIncreasing", 5, True) - x * factor).max() < 1
  # 0.45 * 40 = 18 pixels exactly; bicubic at integer shifts is exact; the rest is the fill
  fill = np.array(T.IMAGENET_FILL, np.uint8)
  out = op("TranslateXRel", 10)
  assert np.array_equal(out[:, :22], x[:, 18:]) and (out[:, 22:] == fill).all()
  out = op("TranslateYRel", 10, True)
  assert np.array_equal(out[18:], x[:22]) and (out[:18] == fill).all()
  for name in ("ShearX", "ShearY", "Rotate", "TranslateXRel", "ColorIncreasing"):
    assert np.array_equal(op(name, 0), x)  # magnitude 0 is the identity
  out = T.apply_op(x, "Rotate", 90.0)  # PIL rotates counter-clockwise around the centre
  assert np.array_equal(out, np.rot90(x))
  narrow = (40 + x.astype(int) * 150 // 255).astype(np.uint8)  # values in [40, 190]
  lo, hi = narrow.min((0, 1)), narrow.max((0, 1))
  ref = (narrow - lo) * 255.0 / (hi - lo)
  assert np.abs(T.apply_op(narrow, "AutoContrast") - ref).max() < 1


def test_rand_augment_contract():
  x = _image(13, 32, 48)
  a = T.rand_augment(x, np.random.default_rng(3))
  assert a.shape == x.shape and a.dtype == np.uint8
  assert np.array_equal(a, T.rand_augment(x, np.random.default_rng(3)))
  outs = [T.rand_augment(x, np.random.default_rng(s)) for s in range(8)]
  assert any(not np.array_equal(outs[0], o) for o in outs[1:])
  assert any(not np.array_equal(o, x) for o in outs)
  assert T.rand_augment(x, np.random.default_rng(3), "") is x
  assert np.array_equal(T.rand_augment(x, np.random.default_rng(3), "rand-m9-p0"), x)
  assert np.array_equal(T.rand_augment(x, np.random.default_rng(3), "rand-m9-n0"), x)
  # one op, always applied, magnitude exactly 9: the output is one of the op set's results
  rng = np.random.default_rng(4)
  candidates = [T.apply_op(x, n, *T.level_args(n, 9, neg))
                for n in T.RAND_INCREASING_TRANSFORMS for neg in (False, True)]
  for _ in range(6):
    out = T.rand_augment(x, rng, "rand-m9-n1-p1-mstd0-inc1")
    assert any(np.array_equal(out, c) for c in candidates)
  with pytest.raises(ValueError, match="unknown key"):
    T.rand_augment(x, rng, "rand-m9-q1")


def test_train_transform():
  img = _image(14, 45, 60)
  cfg = types.SimpleNamespace(image_size=24, crop_pct=0.875, scale=(0.08, 1.0),
                              ratio=(3 / 4, 4 / 3), hflip=0.5, randaugment="rand-m9-mstd0.5-inc1",
                              interpolation="bicubic")
  a = T.train_transform(img, np.random.default_rng(5), cfg)
  assert a.shape == (24, 24, 3) and a.dtype == np.uint8
  assert np.array_equal(a, T.train_transform(img, np.random.default_rng(5), cfg))
  # no flip, no RandAugment: exactly random_resized_crop with the same stream
  plain = types.SimpleNamespace(**{**vars(cfg), "hflip": 0.0, "randaugment": ""})
  assert np.array_equal(T.train_transform(img, np.random.default_rng(6), plain),
                        T.random_resized_crop(img, np.random.default_rng(6), 24))


# ------------------------------------------------------------------------------------------------
# On-device augmentation (jitted)


def test_normalize_and_eval_batch():
  imgs = jnp.asarray(np.random.default_rng(15).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8))
  cfg = _Hashable(mean=A.IMAGENET_DEFAULT_MEAN, std=A.IMAGENET_DEFAULT_STD)
  out = jax.jit(A.eval_batch, static_argnums=1)(imgs, cfg)
  ref = (np.asarray(imgs) / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
  assert out.dtype == jnp.float32 and np.allclose(out, ref, atol=1e-5)
  with pytest.raises(ValueError, match="mean"):
    A.normalize(imgs, (0.5, 0.5), (0.2, 0.2))


class _Hashable(types.SimpleNamespace):
  """A config usable as a static jit argument (like a FrozenConfigDict)."""

  def __hash__(self):
    return hash(tuple(sorted(vars(self).items())))


_erase = jax.jit(A.random_erasing)  # prob traced: one compile for every prob


def _erased_boxes(out, x):
  """Per sample: the boolean mask of changed pixels."""
  return np.any(np.asarray(out) != np.asarray(x), axis=-1)


def test_random_erasing():
  B, H, W = 32, 32, 40
  x = jnp.full((B, H, W, 3), 7.0, jnp.float32)  # noise never equals 7 exactly
  key = jax.random.PRNGKey(16)
  assert np.array_equal(_erase(key, x, 0.0), x)
  out = _erase(key, x, 1.0)
  changed_BHW = _erased_boxes(out, x)
  noise = np.asarray(out)[changed_BHW]
  for b in range(B):
    rows, cols = np.nonzero(changed_BHW[b])
    assert rows.size, f"sample {b} was not erased"
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert rows.size == h * w  # one filled axis-aligned rectangle, the rest untouched
    assert h < H and w < W
    # area fraction in [0.02, 1/3] and aspect h/w in [0.3, 1/0.3], up to the sides' rounding
    assert (h - 0.5) * (w - 0.5) <= H * W / 3 and (h + 0.5) * (w + 0.5) >= 0.02 * H * W
    assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
  assert (noise != 7.0).all()  # every channel of an erased pixel is fresh noise
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
  erased = [_erased_boxes(_erase(jax.random.PRNGKey(s), x, 0.5), x).any((1, 2)).sum()
            for s in range(3)]
  assert 30 < sum(erased) < 66  # Binomial(96, 0.5)


@functools.lru_cache(maxsize=None)
def _mix(num_classes, mixup_alpha, cutmix_alpha, switch_prob, smoothing):
  return jax.jit(functools.partial(A.mixup_cutmix, num_classes=num_classes,
                                   mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                                   switch_prob=switch_prob, label_smoothing=smoothing))


K, SMOOTH = 10, 0.1
OFF = SMOOTH / K
ON = 1 - SMOOTH + OFF


def _mix_inputs(seed, B=8, H=12, W=16):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.standard_normal((B, H, W, 3)), jnp.float32)
  labels = jnp.asarray(r.permutation(K)[:B], jnp.int32)  # distinct: lam readable from targets
  return x, labels


def _lam_from_targets(targets, labels):
  t = np.asarray(targets)[np.arange(len(labels)), np.asarray(labels)]
  return (t - OFF) / (ON - OFF)


def _is_mixup(out, x, lam):
  return np.allclose(out, lam * np.asarray(x) + (1 - lam) * np.asarray(x)[::-1], atol=1e-5)


def _is_cutmix(out, x, lam):
  out, x = np.asarray(out), np.asarray(x)
  from_flip_BHW = np.all(out == x[::-1], -1)
  from_x_BHW = np.all(out == x, -1)
  if not (from_flip_BHW ^ from_x_BHW).all():
    return False
  box = from_flip_BHW[0]
  rows, cols = np.nonzero(box)
  if rows.size and rows.size != (np.ptp(rows) + 1) * (np.ptp(cols) + 1):
    return False
  return (from_flip_BHW == box).all() and abs(box.mean() - (1 - lam)) < 1e-6


def test_mixup_cutmix_off_is_smoothed_one_hot():
  x, labels = _mix_inputs(17)
  out, targets = _mix(K, 0.0, 0.0, 0.5, SMOOTH)(jax.random.PRNGKey(0), x, labels)
  expected = np.full((8, K), np.float32(OFF))
  expected[np.arange(8), np.asarray(labels)] = np.float32(ON)
  assert targets.dtype == jnp.float32 and np.array_equal(targets, expected)
  assert np.array_equal(out, x)


def test_mixup_only():
  x, labels = _mix_inputs(18)
  fn = _mix(K, 0.8, 0.0, 0.5, SMOOTH)
  lams = []
  for s in range(4):
    out, targets = fn(jax.random.PRNGKey(s), x, labels)
    lam = _lam_from_targets(targets, labels)
    assert np.allclose(lam, lam[0], atol=1e-6) and 0 <= lam[0] <= 1
    assert np.allclose(np.asarray(targets).sum(1), 1, atol=1e-6)
    assert _is_mixup(out, x, lam[0])
    lams.append(lam[0])
  assert len(set(np.round(lams, 6))) == 4
  with pytest.raises(ValueError, match="even"):
    A.mixup_cutmix(jax.random.PRNGKey(0), x[:3], labels[:3], K)


def test_cutmix_only():
  x, labels = _mix_inputs(19)
  fn = _mix(K, 0.0, 1.0, 0.5, SMOOTH)
  for s in range(4):
    out, targets = fn(jax.random.PRNGKey(s), x, labels)
    lam = _lam_from_targets(targets, labels)
    assert np.allclose(np.asarray(targets).sum(1), 1, atol=1e-6)
    assert _is_cutmix(out, x, lam[0])


def test_cutmix_box_geometry():
  x, _ = _mix_inputs(22, B=2, H=12, W=16)
  cut = jax.jit(A._cutmix)
  for s in range(8):  # lam 0.75: a 6 x 8 box (sqrt(0.25) of each side), clipped at the borders
    out, lam = cut(jax.random.PRNGKey(s), x, jnp.float32(0.75))
    box = np.all(np.asarray(out) == np.asarray(x)[::-1], -1)[0]
    rows, cols = np.nonzero(box)
    h, w = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert rows.size == h * w and abs(lam - (1 - h * w / (12 * 16))) < 1e-6
    assert h == 6 or (h < 6 and (rows.min() == 0 or rows.max() == 11))
    assert w == 8 or (w < 8 and (cols.min() == 0 or cols.max() == 15))


def test_mixup_cutmix_switch():
  x, labels = _mix_inputs(20)
  fn = _mix(K, 0.8, 1.0, 0.5, SMOOTH)
  kinds = []
  for s in range(12):
    out, targets = fn(jax.random.PRNGKey(100 + s), x, labels)
    lam = _lam_from_targets(targets, labels)[0]
    cut, mix = _is_cutmix(out, x, lam), _is_mixup(out, x, lam)
    assert cut or mix
    kinds.append(cut)
  assert 0 < sum(kinds) < 12


def test_train_batch():
  imgs = jnp.asarray(np.random.default_rng(21).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
  labels = jnp.asarray([1, 3, 0, 2], jnp.int32)
  base = dict(mean=A.IMAGENET_DEFAULT_MEAN, std=A.IMAGENET_DEFAULT_STD, mixup_switch_prob=0.5,
              label_smoothing=SMOOTH)
  step = jax.jit(A.train_batch, static_argnums=(3, 4))
  off = _Hashable(**base, reprob=0.0, mixup=0.0, cutmix=0.0)
  x, targets = step(jax.random.PRNGKey(0), imgs, labels, off, K)
  assert np.allclose(x, A.normalize(imgs, base["mean"], base["std"]), atol=1e-6)
  assert np.allclose(targets, np.asarray(A.smooth_one_hot(labels, K, SMOOTH)))
  on = _Hashable(**base, reprob=0.25, mixup=0.8, cutmix=1.0)
  x, targets = step(jax.random.PRNGKey(1), imgs, labels, on, K)
  assert x.shape == (4, 16, 16, 3) and x.dtype == jnp.float32 and targets.shape == (4, K)
  assert np.isfinite(x).all() and np.allclose(np.asarray(targets).sum(1), 1, atol=1e-6)
