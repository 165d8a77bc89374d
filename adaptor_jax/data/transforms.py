"""Host-side image transforms (numpy / PIL / simplejpeg), one image at a time, for grain map workers.

Images are uint8 arrays img_HW3 (RGB). Randomness comes from a `np.random.Generator` passed in, so
a worker's output is a pure function of its seed. Semantics follow torchvision and timm, which the
field's ImageNet recipes (DeiT, Swin, VMamba) use:
  decode               PIL's decode, JPEG through libjpeg-turbo (simplejpeg), bit-identical to PIL's
  random_resized_crop  torchvision RandomResizedCrop (Inception crop): crop, then PIL resize
  hflip                torchvision RandomHorizontalFlip
  rand_augment         timm rand_augment_transform ("rand-m9-mstd0.5-inc1")
  resize_center_crop   timm eval transform: Resize(floor(size / crop_pct)) then CenterCrop(size)
Normalisation, random erasing and mixup/cutmix run on device (adaptor_jax/data/augment.py).
"""
import dataclasses
import functools
import io
import math
import re

import numpy as np
import simplejpeg
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_FILL = (124, 116, 104)  # round(255 * IMAGENET_DEFAULT_MEAN), timm's RandAugment fill

_INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# JPEG colour spaces libjpeg-turbo converts to RGB exactly as PIL does; CMYK / YCCK go through PIL.
_SIMPLEJPEG_COLORSPACES = ("YCbCr", "Gray", "RGB")


def _resample(interpolation):
  try:
    return _INTERPOLATIONS[interpolation]
  except KeyError:
    raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                     f"got {interpolation!r}") from None


def _check_image(img_HW3, where):
  if not isinstance(img_HW3, np.ndarray) or img_HW3.dtype != np.uint8 or img_HW3.ndim != 3 \
      or img_HW3.shape[2] != 3:
    desc = f"{img_HW3.dtype} {img_HW3.shape}" if isinstance(img_HW3, np.ndarray) else type(img_HW3)
    raise ValueError(f"{where}: expected a uint8 (H, W, 3) array, got {desc}")
  if img_HW3.shape[0] < 1 or img_HW3.shape[1] < 1:
    raise ValueError(f"{where}: empty image of shape {img_HW3.shape}")


def _check_size(size, where):
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"{where}: size must be a positive int, got {size!r}")


# ------------------------------------------------------------------------------------------------
# Decoding


def decode(data: bytes, min_size=None) -> np.ndarray:
  """Decodes image bytes to uint8 (H, W, 3) RGB; raises ValueError when they are not an image.

  JPEGs in YCbCr / grayscale / RGB go through simplejpeg (libjpeg-turbo; same pixels as PIL's
  decoder, faster); anything else (PNG, CMYK JPEG, GIF, ...) and JPEGs libjpeg-turbo flags as
  corrupt (PIL tolerates recoverable errors) through PIL, converted to RGB like torchvision's
  loader (alpha dropped, palette expanded, grayscale replicated).

  min_size: if given, a JPEG may be decoded with libjpeg-turbo's DCT-domain downscaling by a factor
  of 2 or more, as long as both sides stay >= min_size. That output is a box-like low-pass of the
  full image, close to but not bit-identical with full decode + PIL resize, and the image's size
  changes. Use it only where the image is next resized so its shorter side is <= min_size (eval:
  min_size = floor(image_size / crop_pct)); None (default) always decodes at full size.
  """
  if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
    data = data.tobytes()
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise ValueError(f"decode: expected bytes, got {type(data).__name__}")
  data = bytes(data)
  if simplejpeg.is_jpeg(data):
    try:
      _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
      if colorspace in _SIMPLEJPEG_COLORSPACES:
        if min_size:
          return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=int(min_size),
                                        min_width=int(min_size), min_factor=2)
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
      pass  # recoverable corruption (strict libjpeg-turbo) or odd header: PIL is more lenient
  try:
    with Image.open(io.BytesIO(data)) as pil:
      img = np.array(pil.convert("RGB"))
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
    raise ValueError(f"decode: undecodable image ({type(e).__name__}: {e})") from None
  if img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
    raise ValueError(f"decode: decoded to an unexpected shape {img.shape}")
  return img


# ------------------------------------------------------------------------------------------------
# Crops, flips, resizes


def random_resized_crop_params(height, width, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params: returns (top, left, h, w) of the crop.

  Up to 10 tries: area fraction ~ U(scale), aspect w/h ~ exp(U(log ratio)), side lengths rounded
  (Python round); the first that fits is placed uniformly. Otherwise the whole image, centre-cropped
  to the nearest aspect ratio inside `ratio`.
  """
  scale, ratio = tuple(map(float, scale)), tuple(map(float, ratio))
  if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
    raise ValueError(f"random_resized_crop: scale must be (lo, hi) with 0 < lo <= hi, got {scale}")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"random_resized_crop: ratio must be (lo, hi) with 0 < lo <= hi, got {ratio}")
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _random_resized_crop_pil(img_HW3, rng, size, scale, ratio, interpolation):
  resample = _resample(interpolation)
  _check_size(size, "random_resized_crop")
  _check_image(img_HW3, "random_resized_crop")
  top, left, h, w = random_resized_crop_params(img_HW3.shape[0], img_HW3.shape[1], rng, scale,
                                               ratio)
  # Crop first, then resize (torchvision's resized_crop): the filter sees no pixels outside.
  crop = Image.fromarray(np.ascontiguousarray(img_HW3[top:top + h, left:left + w]))
  return crop.resize((size, size), resample)


def random_resized_crop(img_HW3, rng, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                        interpolation="bicubic") -> np.ndarray:
  """torchvision RandomResizedCrop(size, scale, ratio) with PIL resampling -> uint8 (size, size, 3)."""
  return np.array(_random_resized_crop_pil(img_HW3, rng, size, scale, ratio, interpolation))


def hflip(img_HW3, rng, p=0.5) -> np.ndarray:
  """Mirrors the image left-right with probability p (torchvision RandomHorizontalFlip)."""
  _check_image(img_HW3, "hflip")
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"hflip: p must be in [0, 1], got {p}")
  if rng.random() < p:
    return np.ascontiguousarray(img_HW3[:, ::-1])
  return img_HW3


def _resize_center_crop_pil(img_HW3, size, crop_pct, interpolation):
  resample = _resample(interpolation)
  _check_size(size, "resize_center_crop")
  _check_image(img_HW3, "resize_center_crop")
  if not 0.0 < crop_pct <= 1.0:
    raise ValueError(f"resize_center_crop: crop_pct must be in (0, 1], got {crop_pct}")
  height, width = img_HW3.shape[:2]
  short_target = int(math.floor(size / crop_pct))
  # torchvision Resize(int): shorter side -> short_target, longer side int(target * long / short).
  if height <= width:
    new_h, new_w = short_target, int(short_target * width / height)
  else:
    new_h, new_w = int(short_target * height / width), short_target
  pil = Image.fromarray(img_HW3).resize((new_w, new_h), resample)
  # torchvision CenterCrop: offsets int(round((in - out) / 2)) (Python round, half to even).
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return pil.crop((left, top, left + size, top + size))


def resize_center_crop(img_HW3, size, crop_pct=0.875, interpolation="bicubic") -> np.ndarray:
  """Eval transform: shorter side -> floor(size / crop_pct) (224 -> 256), centre crop size x size."""
  return np.array(_resize_center_crop_pil(img_HW3, size, crop_pct, interpolation))


# ------------------------------------------------------------------------------------------------
# RandAugment (timm auto_augment.rand_augment_transform)

_MAX_LEVEL = 10.0  # timm _LEVEL_DENOM: magnitudes are in [0, 10]
_TRANSLATE_PCT = 0.45

RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# Ops whose argument takes a random sign (timm _randomly_negate).
SIGNED_OPS = frozenset((
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
    "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"))


def level_args(name, magnitude, negate=False) -> tuple:
  """The op's arguments at `magnitude` in [0, 10] (timm LEVEL_TO_ARG); negate flips signed ones."""
  m = float(magnitude) / _MAX_LEVEL
  sign = -1.0 if (negate and name in SIGNED_OPS) else 1.0
  if name in ("AutoContrast", "Equalize", "Invert"):
    return ()
  if name == "Rotate":
    return (sign * m * 30.0,)
  if name in ("ShearX", "ShearY"):
    return (sign * m * 0.3,)
  if name in ("TranslateXRel", "TranslateYRel"):
    return (sign * m * _TRANSLATE_PCT,)
  if name == "Posterize":
    return (int(m * 4),)  # bits kept, 0..4
  if name == "PosterizeIncreasing":
    return (4 - int(m * 4),)  # bits kept, 4..0
  if name == "Solarize":
    return (min(256, int(m * 256)),)  # threshold
  if name == "SolarizeIncreasing":
    return (256 - min(256, int(m * 256)),)
  if name == "SolarizeAdd":
    return (min(128, int(m * 110)),)  # added below threshold 128
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return (m * 1.8 + 0.1,)  # enhance factor
  if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
              "SharpnessIncreasing"):
    return (max(0.1, 1.0 + sign * m * 0.9),)
  raise ValueError(f"rand_augment: unknown op {name!r}")


def _affine(pil, coeffs, fill, resample):
  return pil.transform(pil.size, Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=fill)


def _posterize(pil, bits):
  """Keeps the top `bits` bits; 0 bits gives black (old PIL and TF; Pillow >= 11 rejects 0)."""
  if bits >= 8:
    return pil
  mask = (0xFF << (8 - max(bits, 0))) & 0xFF
  return pil.point([i & mask for i in range(256)] * 3)


def _solarize_add(pil, add, threshold=128):
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return pil.point(lut * 3)


def _apply_op_pil(pil, name, args, fill, resample):
  base = name[:-len("Increasing")] if name.endswith("Increasing") else name
  if base == "AutoContrast":
    return ImageOps.autocontrast(pil)
  if base == "Equalize":
    return ImageOps.equalize(pil)
  if base == "Invert":
    return ImageOps.invert(pil)
  if base == "Rotate":
    return pil.rotate(args[0], resample=resample, fillcolor=fill)
  if base == "Posterize":
    return _posterize(pil, args[0])
  if base == "Solarize":
    return ImageOps.solarize(pil, args[0])  # inverts pixels >= threshold
  if base == "SolarizeAdd":
    return _solarize_add(pil, args[0])
  if base == "Color":
    return ImageEnhance.Color(pil).enhance(args[0])
  if base == "Contrast":
    return ImageEnhance.Contrast(pil).enhance(args[0])
  if base == "Brightness":
    return ImageEnhance.Brightness(pil).enhance(args[0])
  if base == "Sharpness":
    return ImageEnhance.Sharpness(pil).enhance(args[0])
  # Affine maps send output pixel (x, y) to input (a x + b y + c, d x + e y + f).
  if base == "ShearX":
    return _affine(pil, (1, args[0], 0, 0, 1, 0), fill, resample)
  if base == "ShearY":
    return _affine(pil, (1, 0, 0, args[0], 1, 0), fill, resample)
  if base == "TranslateXRel":
    return _affine(pil, (1, 0, args[0] * pil.size[0], 0, 1, 0), fill, resample)
  if base == "TranslateYRel":
    return _affine(pil, (1, 0, 0, 0, 1, args[0] * pil.size[1]), fill, resample)
  raise ValueError(f"rand_augment: unknown op {name!r}")


def apply_op(img_HW3, name, *args, fill=IMAGENET_FILL, interpolation="bicubic") -> np.ndarray:
  """Applies one RandAugment op with explicit arguments (see level_args) -> uint8 (H, W, 3)."""
  _check_image(img_HW3, "apply_op")
  out = _apply_op_pil(Image.fromarray(img_HW3), name, args, tuple(fill), _resample(interpolation))
  return np.array(out)


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
  """A parsed timm RandAugment string."""
  ops: tuple = RAND_TRANSFORMS
  num_layers: int = 2          # n: ops per image, drawn with replacement
  magnitude: float = 10.0      # m: in [0, 10]
  magnitude_std: float = 0.0   # mstd: gaussian noise on m per op; inf (mstd > 100) = U(0, m)
  magnitude_max: float = _MAX_LEVEL  # mmax: clip bound for the noisy magnitude
  prob: float = 0.5            # p: each chosen op is applied with this probability


@functools.lru_cache(maxsize=64)
def parse_rand_augment(spec: str) -> RandAugmentSpec:
  """Parses "rand-m9-mstd0.5-inc1" style strings (timm); keys m, n, mstd, mmax, inc, p.

  Unlike timm, "inc0" means the standard (non-increasing) op set.
  """
  if not isinstance(spec, str):
    raise ValueError(f"rand_augment spec must be a str, got {type(spec).__name__}")
  parts = spec.split("-")
  if parts[0] != "rand":
    raise ValueError(f"rand_augment spec must start with 'rand', got {spec!r}")
  fields = {}
  for part in parts[1:]:
    match = re.fullmatch(r"([a-z]+)(\d.*)", part)
    if not match:
      raise ValueError(f"rand_augment spec {spec!r}: cannot parse section {part!r}")
    key, val = match.groups()
    if key not in ("m", "n", "mstd", "mmax", "inc", "p"):
      raise ValueError(f"rand_augment spec {spec!r}: unknown key {key!r} "
                       "(known: m, n, mstd, mmax, inc, p)")
    try:
      if key == "m":
        fields["magnitude"] = float(val)
      elif key == "n":
        fields["num_layers"] = int(val)
      elif key == "mstd":
        std = float(val)
        fields["magnitude_std"] = math.inf if std > 100 else std
      elif key == "mmax":
        fields["magnitude_max"] = float(val)
      elif key == "inc":
        fields["ops"] = RAND_INCREASING_TRANSFORMS if int(val) else RAND_TRANSFORMS
      else:
        fields["prob"] = float(val)
    except ValueError:
      raise ValueError(f"rand_augment spec {spec!r}: bad value in section {part!r}") from None
  parsed = RandAugmentSpec(**fields)
  if parsed.num_layers < 0 or not 0.0 <= parsed.prob <= 1.0 or parsed.magnitude < 0 \
      or parsed.magnitude_std < 0 or parsed.magnitude_max <= 0:
    raise ValueError(f"rand_augment spec {spec!r}: value out of range ({parsed})")
  return parsed


def _rand_augment_pil(pil, rng, spec, fill, interpolation):
  if not spec:
    return pil
  parsed = parse_rand_augment(spec)
  resample = _resample(interpolation)
  fill = tuple(int(c) for c in fill)
  if len(fill) != 3:
    raise ValueError(f"rand_augment: fill must be 3 ints, got {fill}")
  # timm RandAugment: num_layers ops drawn with replacement; each applied with prob p; magnitude
  # drawn per op, clipped to [0, mmax]; signed ops take a fair random sign.
  for index in rng.integers(0, len(parsed.ops), size=parsed.num_layers):
    name = parsed.ops[index]
    if parsed.prob < 1.0 and rng.random() > parsed.prob:
      continue
    magnitude = parsed.magnitude
    if parsed.magnitude_std == math.inf:
      magnitude = rng.uniform(0.0, magnitude)
    elif parsed.magnitude_std > 0:
      magnitude = rng.normal(magnitude, parsed.magnitude_std)
    magnitude = min(max(magnitude, 0.0), parsed.magnitude_max)
    negate = name in SIGNED_OPS and rng.random() > 0.5
    pil = _apply_op_pil(pil, name, level_args(name, magnitude, negate), fill, resample)
  return pil


def rand_augment(img_HW3, rng, spec="rand-m9-mstd0.5-inc1", fill=IMAGENET_FILL,
                 interpolation="bicubic") -> np.ndarray:
  """timm RandAugment described by `spec` ("" = identity) -> uint8 (H, W, 3).

  interpolation: resampling of the geometric ops (timm uses the train interpolation when it is
  not "random").
  """
  _check_image(img_HW3, "rand_augment")
  if not spec:
    return img_HW3
  return np.array(_rand_augment_pil(Image.fromarray(img_HW3), rng, spec, fill, interpolation))


# ------------------------------------------------------------------------------------------------
# Composed transforms


def train_transform(img_HW3, rng, cfg) -> np.ndarray:
  """random_resized_crop -> hflip -> rand_augment, from config.data -> uint8 (S, S, 3)."""
  pil = _random_resized_crop_pil(img_HW3, rng, cfg.image_size, tuple(cfg.scale), tuple(cfg.ratio),
                                 cfg.interpolation)
  if not 0.0 <= cfg.hflip <= 1.0:
    raise ValueError(f"train_transform: hflip must be in [0, 1], got {cfg.hflip}")
  if cfg.hflip > 0 and rng.random() < cfg.hflip:
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  pil = _rand_augment_pil(pil, rng, cfg.randaugment, IMAGENET_FILL, cfg.interpolation)
  return np.array(pil)


def eval_transform(img_HW3, cfg) -> np.ndarray:
  """resize_center_crop from config.data -> uint8 (S, S, 3)."""
  return resize_center_crop(img_HW3, cfg.image_size, cfg.crop_pct, cfg.interpolation)
