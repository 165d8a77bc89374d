"""Parity of RoIAlign (adaptor_jax/models/roi_align.py) with torchvision.ops.roi_align, and what our
fixed sampling ratio departs from mmdetection's adaptive one: outside CI, once, on CPU, fp32,
random inputs. Not a test (pytest collects test_*.py only).

(1) roi_align, aligned=True, sampling_ratio=2, 256 channels, 512 boxes (8-600 px, some over the
image's edges) on a stride-8 map of an 800 x 1216 image, 7x7 and 14x14: the forward and the
gradient w.r.t. the features (a random cotangent) against torchvision's, and torchvision's float32
against its float64: the float32 floor our difference sits on.
(2) multilevel_roi_align against mmdetection's SingleRoIExtractor (finest_scale 56, strides 4-32,
RoIAlign aligned=True) restated in torch over torchvision's roi_align: the level of every box (in
torch's float32) and the values, at sampling_ratio=2.
(3) The departure. mmdetection's configs use sampling_ratio=0: ceil(roi size / output size)
samples per bin, data-dependent; we sample a fixed 2 x 2 (or 4 x 4). Per stride (4-32) and box
size (8-600 px, sqrt of the area, aspect 1:2 to 2:1, inside the image), torchvision with 0
against ours with 1, 2 and 4, on two kinds of features: white noise N(0, 1) (the worst case: no
two pixels alike) and smooth ones (white noise blurred by a Gaussian of sigma 2 px, rescaled to
std 1; closer to an FPN's). Each cell: max and mean |diff| over boxes, bins and channels, in units
of the features' std (1), and rms(diff) / rms(torchvision's output). Then the same for the recipe
as it runs: 512 boxes of 8-600 px, each on the level mmdetection assigns, 7x7 (box head) and
14x14 (mask head).

Run (the torch side in its own venv, appended to sys.path after this project's .venv):
  .venv/bin/python tests/parity_roi_align.py --torch_site=/tmp/parity/lib/python3.11/site-packages
It printed (torch 2.14.1, torchvision 0.29.1, jax 0.10.2; 2 shared CPU cores, 41 s):
  torch 2.14.1+cu130, torchvision 0.29.1+cu130, jax 0.10.2
  roi_align 1x256x100x152, 512 boxes, 7x7, ratio 2, aligned: out: max |ours - tv| 3.6e-05, |tv - tv
        fp64| 5.7e-05, |ours - tv fp64| 5.7e-05 (max |out| 3.91); feature grad: max |ours - tv|
        1.0e-04, |tv - tv fp64| 1.1e-04, |ours - tv fp64| 1.1e-04 (max |feature grad| 14.12);
  roi_align 1x256x100x152, 512 boxes, 14x14, ratio 2, aligned: out: max |ours - tv| 8.3e-05, |tv -
        tv fp64| 6.3e-05, |ours - tv fp64| 6.7e-05 (max |out| 4.31); feature grad: max |ours - tv|
        1.7e-04, |tv - tv fp64| 2.2e-04, |ours - tv fp64| 2.3e-04 (max |feature grad| 26.88);
    torch's levels of the boxes at the level edges [111.99994659423828, 223.9999542236328,
        447.9999084472656, 111.99993896484375, 223.99993896484375, 447.9998779296875]: [1, 2, 3, 0,
        1, 2]
  multilevel 256 ch, strides (4, 8, 16, 32), 512 boxes (16 padded), 7x7, ratio 2: levels identical
        (boxes per level [310, 83, 85, 34]); max |ours - mmdet| 6.7e-05 (max |out| 3.34)
    torch's levels of the boxes at the level edges [111.99994659423828, 223.9999542236328,
        447.9999084472656, 111.99993896484375, 223.99993896484375, 447.9998779296875]: [1, 2, 3, 0,
        1, 2]
  multilevel 256 ch, strides (4, 8, 16, 32), 512 boxes (16 padded), 14x14, ratio 2: levels identical
        (boxes per level [310, 83, 85, 34]); max |ours - mmdet| 1.6e-04 (max |out| 3.83)
  white features: sampling_ratio 0 (torchvision) vs ours 1 / 2 / 4, 7x7; max |diff|, mean |diff|
        (feature std 1), rms(diff) / rms(out); [adaptive ratio]
    stride  4,   8 px [1-1]: 0.000 0.0000 0.000 | 0.417 0.0085 0.038 | 0.417 0.0107 0.041
    stride  4,  16 px [1-1]: 0.000 0.0000 0.000 | 0.917 0.0362 0.112 | 0.922 0.0435 0.120
    stride  4,  32 px [1-2]: 1.915 0.1112 0.335 | 0.678 0.0161 0.088 | 0.851 0.0436 0.128
    stride  4,  64 px [2-4]: 2.672 0.3525 1.258 | 0.949 0.0582 0.228 | 0.297 0.0278 0.108
    stride  4, 128 px [3-8]: 3.354 0.4901 3.065 | 1.451 0.1908 1.204 | 0.367 0.0299 0.212
    stride  4, 256 px [6-16]: 3.587 0.5135 6.156 | 1.626 0.2477 2.958 | 0.720 0.0970 1.165
    stride  4, 600 px [14-35]: 3.802 0.5252 14.232 | 1.603 0.2620 7.063 | 0.794 0.1266 3.402
    stride  8,   8 px [1-1]: 0.000 0.0000 0.000 | 0.223 0.0025 0.014 | 0.223 0.0030 0.015
    stride  8,  16 px [1-1]: 0.000 0.0000 0.000 | 0.490 0.0089 0.038 | 0.490 0.0109 0.041
    stride  8,  32 px [1-1]: 0.000 0.0000 0.000 | 0.914 0.0342 0.110 | 0.914 0.0428 0.119
    stride  8,  64 px [1-2]: 1.943 0.1089 0.326 | 0.726 0.0205 0.102 | 0.815 0.0481 0.139
    stride  8, 128 px [2-4]: 3.214 0.3496 1.234 | 0.725 0.0577 0.222 | 0.295 0.0300 0.112
    stride  8, 256 px [3-8]: 3.770 0.4920 3.081 | 1.393 0.1895 1.195 | 0.474 0.0300 0.213
    stride  8, 600 px [7-16]: 4.059 0.5226 7.231 | 1.987 0.2525 3.480 | 0.767 0.1076 1.485
    stride 16,   8 px [1-1]: 0.000 0.0000 0.000 | 0.096 0.0006 0.005 | 0.096 0.0007 0.005
    stride 16,  16 px [1-1]: 0.000 0.0000 0.000 | 0.152 0.0024 0.013 | 0.160 0.0029 0.014
    stride 16,  32 px [1-1]: 0.000 0.0000 0.000 | 0.437 0.0084 0.038 | 0.437 0.0102 0.040
    stride 16,  64 px [1-1]: 0.000 0.0000 0.000 | 1.091 0.0318 0.105 | 1.091 0.0399 0.114
    stride 16, 128 px [1-2]: 1.762 0.1072 0.325 | 0.840 0.0193 0.098 | 0.857 0.0461 0.136
    stride 16, 256 px [2-4]: 3.231 0.3571 1.279 | 0.793 0.0620 0.241 | 0.362 0.0282 0.109
    stride 16, 600 px [4-9]: 3.142 0.5031 3.595 | 1.434 0.2105 1.508 | 0.555 0.0466 0.351
    stride 32,   8 px [1-1]: 0.000 0.0000 0.000 | 0.029 0.0002 0.002 | 0.029 0.0002 0.002
    stride 32,  16 px [1-1]: 0.000 0.0000 0.000 | 0.074 0.0005 0.005 | 0.074 0.0007 0.005
    stride 32,  32 px [1-1]: 0.000 0.0000 0.000 | 0.178 0.0021 0.012 | 0.178 0.0027 0.013
    stride 32,  64 px [1-1]: 0.000 0.0000 0.000 | 0.538 0.0089 0.040 | 0.538 0.0107 0.042
    stride 32, 128 px [1-1]: 0.000 0.0000 0.000 | 1.016 0.0336 0.108 | 1.016 0.0422 0.117
    stride 32, 256 px [1-2]: 1.775 0.1077 0.320 | 1.178 0.0238 0.116 | 1.178 0.0492 0.148
    stride 32, 600 px [2-5]: 3.109 0.3960 1.583 | 0.942 0.0876 0.373 | 0.233 0.0207 0.095
  smooth features: sampling_ratio 0 (torchvision) vs ours 1 / 2 / 4, 7x7; max |diff|, mean |diff|
        (feature std 1), rms(diff) / rms(out); [adaptive ratio]
    stride  4,   8 px [1-1]: 0.000 0.0000 0.000 | 0.041 0.0010 0.003 | 0.041 0.0012 0.003
    stride  4,  16 px [1-1]: 0.000 0.0000 0.000 | 0.080 0.0034 0.007 | 0.088 0.0041 0.008
    stride  4,  32 px [1-2]: 0.177 0.0115 0.020 | 0.083 0.0027 0.007 | 0.091 0.0058 0.010
    stride  4,  64 px [2-4]: 0.453 0.0537 0.075 | 0.114 0.0099 0.015 | 0.084 0.0047 0.008
    stride  4, 128 px [3-8]: 1.293 0.2042 0.319 | 0.233 0.0321 0.050 | 0.065 0.0067 0.011
    stride  4, 256 px [6-15]: 3.062 0.4806 1.040 | 0.834 0.0855 0.191 | 0.086 0.0121 0.026
    stride  4, 600 px [13-34]: 4.217 0.7268 3.042 | 1.624 0.2816 1.183 | 0.463 0.0565 0.247
    stride  8,   8 px [1-1]: 0.000 0.0000 0.000 | 0.014 0.0002 0.001 | 0.014 0.0003 0.001
    stride  8,  16 px [1-1]: 0.000 0.0000 0.000 | 0.044 0.0010 0.003 | 0.044 0.0012 0.003
    stride  8,  32 px [1-1]: 0.000 0.0000 0.000 | 0.082 0.0037 0.008 | 0.082 0.0044 0.008
    stride  8,  64 px [1-2]: 0.177 0.0131 0.022 | 0.091 0.0020 0.006 | 0.108 0.0052 0.009
    stride  8, 128 px [2-4]: 0.434 0.0554 0.077 | 0.116 0.0102 0.016 | 0.074 0.0044 0.008
    stride  8, 256 px [3-8]: 1.464 0.2014 0.316 | 0.215 0.0313 0.049 | 0.064 0.0063 0.010
    stride  8, 600 px [7-18]: 3.181 0.5452 1.321 | 0.865 0.1134 0.282 | 0.084 0.0137 0.033
    stride 16,   8 px [1-1]: 0.000 0.0000 0.000 | 0.006 0.0001 0.000 | 0.006 0.0001 0.000
    stride 16,  16 px [1-1]: 0.000 0.0000 0.000 | 0.015 0.0002 0.001 | 0.015 0.0003 0.001
    stride 16,  32 px [1-1]: 0.000 0.0000 0.000 | 0.037 0.0009 0.003 | 0.037 0.0011 0.003
    stride 16,  64 px [1-1]: 0.000 0.0000 0.000 | 0.078 0.0033 0.007 | 0.078 0.0042 0.008
    stride 16, 128 px [1-2]: 0.176 0.0121 0.021 | 0.076 0.0021 0.006 | 0.096 0.0053 0.009
    stride 16, 256 px [2-4]: 0.448 0.0552 0.076 | 0.099 0.0098 0.015 | 0.100 0.0048 0.008
    stride 16, 600 px [4-9]: 1.708 0.2498 0.411 | 0.232 0.0372 0.061 | 0.064 0.0078 0.013
    stride 32,   8 px [1-1]: 0.000 0.0000 0.000 | 0.004 0.0000 0.000 | 0.004 0.0000 0.000
    stride 32,  16 px [1-1]: 0.000 0.0000 0.000 | 0.007 0.0001 0.000 | 0.007 0.0001 0.000
    stride 32,  32 px [1-1]: 0.000 0.0000 0.000 | 0.014 0.0002 0.001 | 0.014 0.0003 0.001
    stride 32,  64 px [1-1]: 0.000 0.0000 0.000 | 0.033 0.0009 0.003 | 0.033 0.0011 0.003
    stride 32, 128 px [1-1]: 0.000 0.0000 0.000 | 0.078 0.0034 0.007 | 0.078 0.0043 0.008
    stride 32, 256 px [1-2]: 0.205 0.0111 0.020 | 0.088 0.0024 0.007 | 0.095 0.0056 0.010
    stride 32, 600 px [2-5]: 0.628 0.0766 0.108 | 0.152 0.0140 0.021 | 0.092 0.0041 0.007
  as assigned, white  features, 7x7, 512 boxes 8-600 px (adaptive ratio 1-6, median 2): 3.095 0.2531
        0.851 | 1.489 0.0626 0.228 | 1.489 0.0295 0.113
  as assigned, smooth features, 7x7, 512 boxes 8-600 px (adaptive ratio 1-6, median 2): 0.902 0.0508
        0.095 | 0.161 0.0098 0.018 | 0.102 0.0045 0.008
  as assigned, white  features, 14x14, 512 boxes 8-600 px (adaptive ratio 1-3, median 2): 3.287
        0.1024 0.355 | 1.496 0.0174 0.084 | 1.496 0.0339 0.108
  as assigned, smooth features, 14x14, 512 boxes 8-600 px (adaptive ratio 1-3, median 1): 0.295
        0.0109 0.023 | 0.112 0.0021 0.006 | 0.112 0.0040 0.008
  worst max |ours - torchvision| / max |torchvision| at equal ratios 4.3e-05 (tolerance 0.0001); 34
        s
"""
import argparse
import os
import sys
import time

import numpy as np

IMAGE = (800, 1216)
STRIDES = (4, 8, 16, 32)
# max |ours - torchvision| / max |torchvision|: a sample coordinate's float32 rounding (an ulp of
# ~200 map px is 1.5e-5 px, and XLA divides by a constant as a multiply by its reciprocal) times a
# bilinear slope of a few stds; torchvision's own float32 output is as far from its float64 one
TOLERANCE = 1e-4


def random_boxes(rng, n, sizes=(8, 600), inside=True, image=IMAGE):
  """n boxes with sqrt(area) log-uniform in `sizes` px, aspect 1:2 to 2:1; inside the image, or
  with centres up to 10% past its edges."""
  side = np.exp(rng.uniform(*np.log(sizes), n))
  aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
  w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
  H, W = image
  if inside:
    w, h = np.minimum(w, W), np.minimum(h, H)
    x1, y1 = rng.uniform(0, 1, n) * (W - w), rng.uniform(0, 1, n) * (H - h)
  else:
    x1, y1 = rng.uniform(-0.1, 1.1, n) * W - w / 2, rng.uniform(-0.1, 1.1, n) * H - h / 2
  return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32)


def smooth(rng, shape, sigma=2.0):
  """(C, H, W) white noise blurred by a Gaussian of `sigma` px (periodic, by FFT), std 1."""
  x = rng.normal(size=shape)
  fy = np.fft.fftfreq(shape[1])[:, None]
  fx = np.fft.fftfreq(shape[2])[None, :]
  kernel = np.exp(-2 * (np.pi * sigma) ** 2 * (fy ** 2 + fx ** 2))
  x = np.real(np.fft.ifft2(np.fft.fft2(x) * kernel))
  return ((x - x.mean()) / x.std()).astype(np.float32)


def mmdet_extractor(torch, roi_align, feats, rois, output_size, sampling_ratio, finest_scale=56):
  """mmdetection's SingleRoIExtractor.forward with mmcv's RoIAlign (aligned=True, avg), restated:
  levels from sqrt(w h) (torch float32), each level's boxes through roi_align at 1 / stride."""
  scale = torch.sqrt((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1]))
  levels = torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, len(feats) - 1).long()
  out = feats[0].new_zeros(len(rois), feats[0].shape[1], output_size, output_size)
  for i, (f, stride) in enumerate(zip(feats, STRIDES)):
    mine = levels == i
    if mine.any():
      out[mine] = roi_align(f, [rois[mine]], output_size, 1.0 / stride, sampling_ratio, True)
  return out, levels


def departure(a, b, scale=1.0):
  """(max |a - b|, mean |a - b|) / scale and rms(a - b) / rms(b)."""
  d = np.abs(a - b)
  return d.max() / scale, d.mean() / scale, np.sqrt((d ** 2).mean() / (b ** 2).mean())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch_site", default="/tmp/parity/lib/python3.11/site-packages")
  parser.add_argument("--boxes_per_cell", type=int, default=128)
  parser.add_argument("--channels_per_cell", type=int, default=32)
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # libtpu is installed for AOT compiles only
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from adaptor_jax.models import roi_align as ra  # noqa: PLC0415
  sys.path.append(args.torch_site)   # after this venv's packages: jax, numpy, ... stay ours
  import torch  # noqa: PLC0415
  import torchvision  # noqa: PLC0415
  from torchvision.ops import roi_align as tv_roi_align  # noqa: PLC0415
  torch.set_num_threads(2)
  start = time.time()
  print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, jax {jax.__version__}")
  rng = np.random.default_rng(0)
  hwc = lambda t: jnp.asarray(np.asarray(t).transpose(1, 2, 0))     # (C, H, W) -> (H, W, C)
  kchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)              # (K, h, w, C) -> (K, C, h, w)
  worst = 0.0

  # (1) single level, forward and feature gradient; torchvision in float64 too: float32's floor
  H, W = IMAGE[0] // 8, IMAGE[1] // 8
  x = rng.normal(size=(256, H, W)).astype(np.float32)
  rois = random_boxes(rng, 512, inside=False)
  for size in (7, 14):
    g = rng.normal(size=(512, 256, size, size)).astype(np.float32)
    tv = {}
    for dt in (torch.float32, torch.float64):
      xt = torch.tensor(x[None], dtype=dt, requires_grad=True)
      out = tv_roi_align(xt, [torch.tensor(rois, dtype=dt)], size, 1 / 8, 2, True)
      out.backward(torch.tensor(g, dtype=dt))
      tv[dt] = (out.detach().numpy(), xt.grad[0].numpy())
    f = jax.jit(lambda f, r, s=size: ra.roi_align(f, r, s, 1 / 8, 2, True))
    got, vjp = jax.vjp(f, hwc(x), jnp.asarray(rois))
    grad = np.asarray(vjp(jnp.asarray(g.transpose(0, 2, 3, 1)))[0]).transpose(2, 0, 1)
    line = f"roi_align 1x256x{H}x{W}, 512 boxes, {size}x{size}, ratio 2, aligned:"
    for name, ours, i in (("out", kchw(got), 0), ("feature grad", grad, 1)):
      want, want64 = tv[torch.float32][i], tv[torch.float64][i]
      d = np.abs(ours - want).max()
      worst = max(worst, d / np.abs(want).max())
      line += (f" {name}: max |ours - tv| {d:.1e}, |tv - tv fp64| "
               f"{np.abs(want - want64).max():.1e}, |ours - tv fp64| "
               f"{np.abs(ours - want64).max():.1e} (max |{name}| {np.abs(want).max():.2f});")
    print(line)

  # (2) multilevel against mmdetection's extractor, ratio 2
  feats = [rng.normal(size=(256, IMAGE[0] // s, IMAGE[1] // s)).astype(np.float32)
           for s in STRIDES]
  rois = random_boxes(rng, 512, inside=False)
  rois[-16:] = 0.0   # padding
  edges = np.float32(ra.level_thresholds(4))   # level 1-3's least float32 sqrt(w h), and 1 ulp less
  edges = np.concatenate([edges, np.nextafter(edges, np.float32(0))])
  rois[:6] = np.stack([np.zeros(6), np.zeros(6), edges, edges], axis=1)
  for size in (7, 14):
    want, levels = mmdet_extractor(torch, tv_roi_align, [torch.tensor(f[None]) for f in feats],
                                   torch.tensor(rois), size, 2)
    print(f"  torch's levels of the boxes at the level edges {edges.tolist()}: "
          f"{levels[:6].tolist()}")
    ours = ra.multilevel_roi_align([hwc(f) for f in feats], jnp.asarray(rois), size)
    ours_levels = np.asarray(ra.map_roi_levels(jnp.asarray(rois), 4))
    same = (ours_levels == levels.numpy()).all()
    d = np.abs(kchw(ours) - want.numpy()).max()
    worst = max(worst, d / want.abs().max().item())
    print(f"multilevel 256 ch, strides {STRIDES}, 512 boxes (16 padded), {size}x{size}, ratio 2: "
          f"levels {'identical' if same else 'DIFFER'} (boxes per level "
          f"{np.bincount(ours_levels, minlength=4).tolist()}); max |ours - mmdet| {d:.1e} "
          f"(max |out| {want.abs().max():.2f})")
    assert same

  # (3) the departure of a fixed ratio from the adaptive one
  C, n = args.channels_per_cell, args.boxes_per_cell
  sizes = (8, 16, 32, 64, 128, 256, 600)
  for kind in ("white", "smooth"):
    print(f"\n{kind} features: sampling_ratio 0 (torchvision) vs ours 1 / 2 / 4, 7x7; "
          f"max |diff|, mean |diff| (feature std 1), rms(diff) / rms(out); [adaptive ratio]")
    for stride in STRIDES:
      shape = (C, IMAGE[0] // stride, IMAGE[1] // stride)
      x = rng.normal(size=shape).astype(np.float32) if kind == "white" else smooth(rng, shape)
      fns = {r: jax.jit(lambda f, b, r=r, s=stride: ra.roi_align(f, b, 7, 1 / s, r))
             for r in (1, 2, 4)}
      for side in sizes:
        boxes = random_boxes(rng, n, sizes=(side / 1.19, side * 1.19))
        want = tv_roi_align(torch.tensor(x[None]), [torch.tensor(boxes)], 7, 1 / stride, 0,
                            True).numpy()
        adaptive = np.ceil((boxes[:, 2:] - boxes[:, :2]) / stride / 7).astype(int)
        cells = []
        for r, fn in fns.items():
          cells.append("%.3f %.4f %.3f" % departure(kchw(fn(hwc(x), jnp.asarray(boxes))), want))
        print(f"  stride {stride:2d}, {side:3d} px [{adaptive.min()}-{adaptive.max()}]: "
              + " | ".join(cells))

  for size in (7, 14):
    for kind in ("white", "smooth"):
      feats = [(rng.normal(size=(C, IMAGE[0] // s, IMAGE[1] // s)).astype(np.float32)
                if kind == "white" else smooth(rng, (C, IMAGE[0] // s, IMAGE[1] // s)))
               for s in STRIDES]
      boxes = random_boxes(rng, 512)
      want, levels = mmdet_extractor(torch, tv_roi_align, [torch.tensor(f[None]) for f in feats],
                                     torch.tensor(boxes), size, 0)
      want, levels = want.numpy(), levels.numpy()
      stride = np.asarray(STRIDES)[levels]
      adaptive = np.ceil((boxes[:, 2:] - boxes[:, :2]) / stride[:, None] / size).astype(int)
      cells = []
      for r in (1, 2, 4):
        got = kchw(ra.multilevel_roi_align([hwc(f) for f in feats], jnp.asarray(boxes), size,
                                           sampling_ratio=r))
        cells.append("%.3f %.4f %.3f" % departure(got, want))
      print(f"as assigned, {kind:6s} features, {size}x{size}, 512 boxes 8-600 px (adaptive ratio "
            f"{adaptive.min()}-{adaptive.max()}, median {np.median(adaptive):.0f}): "
            + " | ".join(cells))
  print(f"\nworst max |ours - torchvision| / max |torchvision| at equal ratios {worst:.1e} "
        f"(tolerance {TOLERANCE:g}); {time.time() - start:.0f} s")
  assert worst < TOLERANCE


if __name__ == "__main__":
  main()
