"""On-device batch augmentation in pure JAX: normalisation, random erasing, mixup / cutmix.

Runs inside the jitted train step on a (possibly sharded) batch; the config arguments are Python
numbers (static). Semantics follow timm: RandomErasing(mode="pixel", max_count=1) and
Mixup(mode="batch", prob=1.0, correct_lam=True) with label smoothing.
"""
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def _check_prob(value, name):
  if isinstance(value, numbers.Real) and not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_batch(x, name):
  if x.ndim != 4:
    raise ValueError(f"{name}: expected a (B, H, W, C) batch, got shape {x.shape}")


def normalize(images_BHW3_u8, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
  """(x / 255 - mean) / std in float32; mean and std per channel in 0..1 units."""
  _check_batch(images_BHW3_u8, "normalize")
  channels = images_BHW3_u8.shape[-1]
  if len(mean) != channels or len(std) != channels:
    raise ValueError(f"normalize: mean {mean} and std {std} need {channels} values each")
  if min(std) <= 0:
    raise ValueError(f"normalize: std must be positive, got {std}")
  mean_C = jnp.asarray(mean, jnp.float32)
  std_C = jnp.asarray(std, jnp.float32)
  return (images_BHW3_u8.astype(jnp.float32) / 255.0 - mean_C) / std_C


def _box_mask(top, bottom, left, right, height, width):
  """Boolean mask (..., H, W) of rows [top, bottom) x cols [left, right); bounds broadcast (...)."""
  rows_H1 = lax.broadcasted_iota(jnp.int32, (height, 1), 0)
  cols_1W = lax.broadcasted_iota(jnp.int32, (1, width), 1)
  expand = lambda v: jnp.asarray(v)[..., None, None]
  return ((rows_H1 >= expand(top)) & (rows_H1 < expand(bottom))
          & (cols_1W >= expand(left)) & (cols_1W < expand(right)))


def random_erasing(key, x_BHWC, prob=0.25, *, min_area=0.02, max_area=1 / 3, min_aspect=0.3,
                   attempts=10):
  """timm RandomErasing(mode="pixel", max_count=1) on a normalised batch, per sample.

  With probability prob a sample gets one rectangle of standard-normal noise (per pixel and
  channel). Rectangle: area fraction ~ U(min_area, max_area), aspect h/w ~ exp(U(log min_aspect,
  -log min_aspect)), sides rounded half-to-even like Python's round; of `attempts` candidates the
  first with h < H and w < W is placed uniformly (timm's retry loop, vectorised); none fit -> none.
  prob may be a traced scalar.
  """
  _check_batch(x_BHWC, "random_erasing")
  _check_prob(prob, "random_erasing prob")
  if not 0.0 < min_area <= max_area or not 0.0 < min_aspect <= 1.0:
    raise ValueError(f"random_erasing: need 0 < min_area <= max_area and 0 < min_aspect <= 1, "
                     f"got {min_area}, {max_area}, {min_aspect}")
  if isinstance(prob, numbers.Real) and prob == 0:
    return x_BHWC
  B, H, W, _ = x_BHWC.shape
  k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
  apply_B = jax.random.uniform(k_apply, (B,)) < prob
  area_BT = jax.random.uniform(k_area, (B, attempts), minval=min_area, maxval=max_area) * (H * W)
  log_aspect = math.log(min_aspect)
  aspect_BT = jnp.exp(jax.random.uniform(k_aspect, (B, attempts), minval=log_aspect,
                                         maxval=-log_aspect))
  h_BT = jnp.round(jnp.sqrt(area_BT * aspect_BT)).astype(jnp.int32)
  w_BT = jnp.round(jnp.sqrt(area_BT / aspect_BT)).astype(jnp.int32)
  fits_BT = (h_BT < H) & (w_BT < W)
  first_B1 = jnp.argmax(fits_BT, axis=1)[:, None]
  h_B = jnp.take_along_axis(h_BT, first_B1, axis=1)[:, 0]
  w_B = jnp.take_along_axis(w_BT, first_B1, axis=1)[:, 0]
  erase_B = apply_B & jnp.any(fits_BT, axis=1)
  top_B = jax.random.randint(k_top, (B,), 0, jnp.maximum(H - h_B + 1, 1))
  left_B = jax.random.randint(k_left, (B,), 0, jnp.maximum(W - w_B + 1, 1))
  mask_BHW = _box_mask(top_B, top_B + h_B, left_B, left_B + w_B, H, W) & erase_B[:, None, None]
  noise_BHWC = jax.random.normal(k_noise, x_BHWC.shape, x_BHWC.dtype)
  return jnp.where(mask_BHW[..., None], noise_BHWC, x_BHWC)


def smooth_one_hot(labels_B, num_classes, label_smoothing=0.0):
  """One-hot float32 targets with on = 1 - s + s/K, off = s/K (timm mixup_target)."""
  off_value = label_smoothing / num_classes
  on_value = 1.0 - label_smoothing + off_value
  hot_BK = labels_B.astype(jnp.int32)[:, None] == jnp.arange(num_classes, dtype=jnp.int32)
  return jnp.where(hot_BK, jnp.float32(on_value), jnp.float32(off_value))


def _cutmix(key, x_BHWC, lam):
  """timm rand_bbox + cutmix_bbox_and_lam(correct_lam=True): box from flip(x), corrected lam."""
  _, H, W, _ = x_BHWC.shape
  k_y, k_x = jax.random.split(key)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(H * ratio).astype(jnp.int32)
  cut_w = jnp.floor(W * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_y, (), 0, H)
  cx = jax.random.randint(k_x, (), 0, W)
  # A cut_h x cut_w box centred at (cy, cx) (timm >= 1.0: exact size before clipping).
  top, bottom = jnp.clip(cy - cut_h // 2, 0, H), jnp.clip(cy + (cut_h + 1) // 2, 0, H)
  left, right = jnp.clip(cx - cut_w // 2, 0, W), jnp.clip(cx + (cut_w + 1) // 2, 0, W)
  mask_HW = _box_mask(top, bottom, left, right, H, W)
  mixed = jnp.where(mask_HW[None, :, :, None], jnp.flip(x_BHWC, 0), x_BHWC)
  lam = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (H * W)
  return mixed, lam


def _mixup(x_BHWC, lam):
  lam_x = lam.astype(x_BHWC.dtype)
  return x_BHWC * lam_x + jnp.flip(x_BHWC, 0) * (1 - lam_x), lam


def mixup_cutmix(key, x_BHWC, labels_B, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0,
                 switch_prob=0.5, label_smoothing=0.1):
  """timm Mixup(mode="batch", prob=1) -> (x, targets_BK float32).

  One lam per batch; with probability switch_prob (when both alphas > 0) cutmix: lam ~ Beta(ca, ca),
  a box of area ~(1 - lam) from the batch flipped on axis 0, lam corrected to the clipped box's
  area; else mixup: lam ~ Beta(ma, ma), x * lam + flip(x) * (1 - lam). Targets are
  lam * smooth(y) + (1 - lam) * smooth(flip(y)). Both alphas 0: x unchanged, smoothed one-hot.
  Otherwise the batch size must be even (timm asserts it too).
  """
  _check_batch(x_BHWC, "mixup_cutmix")
  if labels_B.shape != x_BHWC.shape[:1]:
    raise ValueError(f"mixup_cutmix: labels shape {labels_B.shape} does not match batch "
                     f"{x_BHWC.shape[0]}")
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f"mixup_cutmix: alphas must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"mixup_cutmix: label_smoothing must be in [0, 1), got {label_smoothing}")
  _check_prob(switch_prob, "mixup_cutmix switch_prob")
  targets_BK = smooth_one_hot(labels_B, num_classes, label_smoothing)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    return x_BHWC, targets_BK
  if x_BHWC.shape[0] % 2:
    raise ValueError(f"mixup_cutmix: batch size must be even (pairs i, B-1-i), got "
                     f"{x_BHWC.shape[0]}")
  k_switch, k_lam, k_box = jax.random.split(key, 3)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
    alpha = jnp.where(use_cutmix, jnp.float32(cutmix_alpha), jnp.float32(mixup_alpha))
    lam = jax.random.beta(k_lam, alpha, alpha)
    x_BHWC, lam = lax.cond(use_cutmix, lambda x: _cutmix(k_box, x, lam), lambda x: _mixup(x, lam),
                           x_BHWC)
  elif cutmix_alpha > 0:
    lam = jax.random.beta(k_lam, cutmix_alpha, cutmix_alpha)
    x_BHWC, lam = _cutmix(k_box, x_BHWC, lam)
  else:
    lam = jax.random.beta(k_lam, mixup_alpha, mixup_alpha)
    x_BHWC, lam = _mixup(x_BHWC, lam)
  targets_BK = lam * targets_BK + (1.0 - lam) * jnp.flip(targets_BK, 0)
  return x_BHWC, targets_BK


def train_batch(key, images_BHW3_u8, labels_B, cfg, num_classes):
  """normalize -> random_erasing(cfg.reprob) -> mixup_cutmix; cfg is config.data.

  Returns (x_BHW3 float32, targets_BK float32).
  """
  k_erase, k_mix = jax.random.split(key)
  x_BHWC = normalize(images_BHW3_u8, tuple(cfg.mean), tuple(cfg.std))
  x_BHWC = random_erasing(k_erase, x_BHWC, cfg.reprob)
  return mixup_cutmix(k_mix, x_BHWC, labels_B, num_classes, cfg.mixup, cfg.cutmix,
                      cfg.mixup_switch_prob, cfg.label_smoothing)


def eval_batch(images_BHW3_u8, cfg):
  """normalize with cfg.mean / cfg.std -> float32."""
  return normalize(images_BHW3_u8, tuple(cfg.mean), tuple(cfg.std))
