"""Parity of the box ops (adaptor_jax/models/boxes.py) with torchvision: outside CI, by hand, on
CPU, fp32, fresh random inputs. Not a test (pytest collects test_*.py only).

Against torchvision itself: iou vs torchvision.ops.box_iou (ours 0 where theirs is NaN: padded
all-zero boxes), nms vs torchvision.ops.nms, batched_nms vs torchvision.ops.batched_nms (at
N = 2000 on CPU its per-class path; its coordinate-offset path, mmcv's method, is compared too),
with valid_N masks against torchvision on the valid subset. Scores are uniform, or in 1/64 steps
(ties). Ours jitted, XLA's optimisations on.

mmdetection is not installed (it needs mmcv): the coder and the anchors are compared with
transcriptions of mmdet 3.x's code in torch ops written here (bbox2delta, delta2bbox with
clip_border=True, AnchorGenerator's gen_single_level_base_anchors and single_level_grid_priors).

Ties: torchvision's nms keeps the lower index first (a stable sort), as ours does; its
batched_nms at this N re-sorts the kept boxes with an unstable sort, so equal scores can come
out in another order ("ties" below: the same boxes kept, the same score sequence). Its
offset path (mmcv's) rounds the offset coordinates and can flip a decision.

Run (torch in its own venv, appended to sys.path after this project's .venv):
  python3 -m venv /tmp/parity && /tmp/parity/bin/pip install torch torchvision
  .venv/bin/python tests/parity_boxes.py --torch_site=/tmp/parity/lib/python3.11/site-packages
It printed (torch 2.14.1, torchvision 0.29.1, jax 0.10.2; 2 CPU cores, 55 s), the per-threshold
lines aside:
  seed 0 iou 2000x300: max |ours - torchvision| 1.2e-07, 0.36% not bitwise equal, 0 NaN (0/0)
        ours 0; 2000x2000: max |ours - torchvision| 1.8e-07, 0.66% not bitwise equal, 1600 NaN
        (0/0) ours 0
  [seeds 1-4 alike: 1.2e-07 to 1.8e-07]
  coder encode stds (1.0, 1.0, 1.0, 1.0): max |ours - mmdet's formulas in torch| 2.4e-07 (0.0
        ulp at 149), 5.55% not bitwise equal
  coder decode (N, 8) stds (1.0, 1.0, 1.0, 1.0) max_shape None: [...] 7.3e-04 (0.8 ulp at 12360)
  coder decode (N, 8) stds (1.0, 1.0, 1.0, 1.0) max_shape (800, 1333): [...] 1.2e-04 (1.0 ulp
        at 1333)
  coder encode stds (0.1, 0.1, 0.2, 0.2): [...] 1.2e-04 (1.0 ulp at 1401)
  coder decode (N, 8) stds (0.1, 0.1, 0.2, 0.2) max_shape None: [...] 1.2e-04 (1.0 ulp at 1801)
  coder decode (N, 8) stds (0.1, 0.1, 0.2, 0.2) max_shape (800, 1333): [...] 1.2e-04 (1.0 ulp
        at 1333)
  anchors 1024x1024, levels [(256, 256), (128, 128), (64, 64), (32, 32), (16, 16)]: 261888
        anchors, bitwise equal
  anchors 800x1333, levels [(200, 334), (100, 167), (50, 84), (25, 42), (13, 21)]: 267069
        anchors, bitwise equal
  our nms, N = 2000, max_out = 2000, jitted: 10.2 ms on cpu
  worst |iou - torchvision| 1.8e-07 (3.0 ulp at 1); coder worst 1.0 ulp at the values' scale;
        anchors bitwise equal: True
  index lists: nms 60 identical; batched_nms 34 identical, 56 ties; batched_nms vs the offset
        trick 1 DIFFER, 59 identical
The IoU's last bits: XLA's vectorised float32 division on this CPU (AVX-512) is not correctly
rounded; with XLA_FLAGS=--xla_cpu_max_isa=AVX every IoU is bitwise torchvision's. The coder's:
XLA's exp and log, and its division by the constant stds.
"""
import argparse
import functools
import math
import sys
import time

import numpy as np

N = 2000
THRESHOLDS = (0.3, 0.5, 0.7)


def random_boxes(rng, n, hw=(800, 1333), clusters=40):
  """n float32 boxes in an image, clustered: many overlaps at every IoU, a few past the border."""
  centres = rng.uniform(0, 1, size=(clusters, 2)) * [hw[1], hw[0]]
  c = centres[rng.integers(0, clusters, n)] + rng.normal(0, 15, size=(n, 2))
  wh = np.exp(rng.uniform(np.log(8), np.log(400), size=(n, 2)))
  return np.concatenate([c - wh / 2, c + wh / 2], -1).astype(np.float32)


def mmdet_bbox2delta(torch, proposals, gt, means, stds):
  """mmdet 3.x bbox2delta, in torch."""
  px = (proposals[..., 0] + proposals[..., 2]) * 0.5
  py = (proposals[..., 1] + proposals[..., 3]) * 0.5
  pw = proposals[..., 2] - proposals[..., 0]
  ph = proposals[..., 3] - proposals[..., 1]
  gx = (gt[..., 0] + gt[..., 2]) * 0.5
  gy = (gt[..., 1] + gt[..., 3]) * 0.5
  gw = gt[..., 2] - gt[..., 0]
  gh = gt[..., 3] - gt[..., 1]
  deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)],
                       dim=-1)
  return deltas.sub_(deltas.new_tensor(means)[None]).div_(deltas.new_tensor(stds)[None])


def mmdet_delta2bbox(torch, rois, deltas, means, stds, max_shape, wh_ratio_clip=16 / 1000):
  """mmdet 3.x delta2bbox (clip_border=True, add_ctr_clamp=False), in torch."""
  num_bboxes, num_classes = deltas.size(0), deltas.size(1) // 4
  deltas = deltas.reshape(-1, 4)
  denorm = deltas * deltas.new_tensor(stds).view(1, -1) + deltas.new_tensor(means).view(1, -1)
  dxy, dwh = denorm[:, :2], denorm[:, 2:]
  rois_ = rois.repeat(1, num_classes).reshape(-1, 4)
  pxy = (rois_[:, :2] + rois_[:, 2:]) * 0.5
  pwh = rois_[:, 2:] - rois_[:, :2]
  dxy_wh = pwh * dxy
  max_ratio = np.abs(np.log(wh_ratio_clip))
  dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
  gxy = pxy + dxy_wh
  gwh = pwh * dwh.exp()
  bboxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
  if max_shape is not None:
    bboxes[..., 0::2].clamp_(min=0, max=max_shape[1])
    bboxes[..., 1::2].clamp_(min=0, max=max_shape[0])
  return bboxes.reshape(num_bboxes, -1)


def mmdet_anchors(torch, featmap_sizes, strides, scales, ratios, center_offset=0.0):
  """mmdet's AnchorGenerator(strides, ratios, scales).grid_priors(featmap_sizes), in torch."""
  out = []
  for (feat_h, feat_w), stride in zip(featmap_sizes, strides):
    w = h = stride
    x_center, y_center = center_offset * w, center_offset * h
    h_ratios = torch.sqrt(torch.Tensor(ratios))
    w_ratios = 1 / h_ratios
    ws = (w * w_ratios[:, None] * torch.Tensor(scales)[None, :]).view(-1)
    hs = (h * h_ratios[:, None] * torch.Tensor(scales)[None, :]).view(-1)
    base = torch.stack([x_center - 0.5 * ws, y_center - 0.5 * hs, x_center + 0.5 * ws,
                        y_center + 0.5 * hs], dim=-1)
    shift_x = torch.arange(0, feat_w).to(torch.float32) * stride
    shift_y = torch.arange(0, feat_h).to(torch.float32) * stride
    xx = shift_x.repeat(shift_y.shape[0])
    yy = shift_y.view(-1, 1).repeat(1, shift_x.shape[0]).view(-1)
    shifts = torch.stack([xx, yy, xx, yy], dim=-1)
    out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
  return out


def compare_lists(ours_idx, ours_ok, theirs, scores):
  """("identical" | "ties" | "DIFFER", a short description). "ties": the same boxes kept, in an
  order that differs only among equal scores."""
  got = [int(i) for i, ok in zip(ours_idx, ours_ok) if ok]
  theirs = [int(i) for i in theirs]
  if got == theirs:
    return "identical", f"{len(got)} kept, identical"
  first = next((k for k, (a, b) in enumerate(zip(got, theirs)) if a != b), min(len(got),
                                                                                 len(theirs)))
  if sorted(got) == sorted(theirs) and np.array_equal(scores[got], scores[theirs]):
    moved = sum(a != b for a, b in zip(got, theirs))
    return "ties", f"{len(got)} kept, the same, {moved} places swapped among equal scores"
  return "DIFFER", f"DIFFER: {len(got)} vs {len(theirs)} kept, first difference at {first}"


def ulps(diff, reference):
  """The largest |diff| in float32 ulps at the reference's scale (its largest magnitude): values
  computed as differences of larger ones (x1 = cx - w / 2) carry their operands' error."""
  return float(np.abs(diff).max() / np.spacing(np.abs(reference).max().astype(np.float32)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch_site", required=True)
  parser.add_argument("--seeds", type=int, default=5)
  args = parser.parse_args()
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from adaptor_jax.models import boxes  # noqa: PLC0415
  sys.path.append(args.torch_site)   # after this venv's packages: jax, numpy, ... stay ours
  import torch  # noqa: PLC0415
  import torchvision  # noqa: PLC0415
  from torchvision.ops import boxes as tv_boxes  # noqa: PLC0415
  print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, jax {jax.__version__}"
        f" ({jax.devices()[0].device_kind}), N = {N}")

  iou_fn = jax.jit(boxes.iou)
  nms_fn = {t: jax.jit(functools.partial(boxes.nms, iou_threshold=t, max_out=N))
            for t in THRESHOLDS}
  bnms_fn = {t: jax.jit(functools.partial(boxes.batched_nms, iou_threshold=t, max_out=N))
             for t in THRESHOLDS}
  worst_iou, worst_iou_ulps, tally = 0.0, 0.0, {}
  for seed in range(args.seeds):
    rng = np.random.default_rng(seed)
    b = random_boxes(rng, N)
    b[rng.choice(N, 40, replace=False)] = 0          # padding: zero boxes
    b2 = random_boxes(rng, 300)
    line = []
    for other in (b2, b):
      got = np.asarray(iou_fn(jnp.asarray(b), jnp.asarray(other)))
      want = tv_boxes.box_iou(torch.from_numpy(b), torch.from_numpy(other)).numpy()
      nan = np.isnan(want)
      assert np.isfinite(got).all() and (got[nan] == 0).all()
      diff = got[~nan] - want[~nan]
      worst_iou = max(worst_iou, float(np.abs(diff).max()))
      worst_iou_ulps = max(worst_iou_ulps, ulps(diff, want[~nan]))
      line.append(f"{len(b)}x{len(other)}: max |ours - torchvision| {np.abs(diff).max():.1e}, "
                  f"{np.mean(diff != 0):.2%} not bitwise equal, {nan.sum()} NaN (0/0) ours 0")
    print(f"seed {seed} iou " + "; ".join(line))

    tb = torch.from_numpy(b)
    for ties in (False, True):
      s = rng.uniform(0, 1, N).astype(np.float32)
      if ties:
        s = (np.floor(s * 64) / 64).astype(np.float32)
      ts = torch.from_numpy(s)
      levels = rng.integers(0, 5, N).astype(np.int32)
      classes = rng.integers(0, 80, N).astype(np.int32)
      valid = rng.uniform(size=N) > 0.2
      sub = np.flatnonzero(valid)
      kind = "1/64-step scores" if ties else "uniform scores"
      for t in THRESHOLDS:
        results = []
        idx, ok = nms_fn[t](jnp.asarray(b), jnp.asarray(s))
        results.append(("nms", compare_lists(idx, ok, torchvision.ops.nms(tb, ts, t), s)))
        idx, ok = nms_fn[t](jnp.asarray(b), jnp.asarray(s), valid_N=jnp.asarray(valid))
        results.append(("nms valid_N", compare_lists(idx, ok, sub[torchvision.ops.nms(
            tb[sub], ts[sub], t).numpy()], s)))
        for name, ids in (("levels", levels), ("classes", classes)):
          tid = torch.from_numpy(ids).long()
          idx, ok = bnms_fn[t](jnp.asarray(b), jnp.asarray(s), jnp.asarray(ids))
          results.append((f"batched_nms {name}", compare_lists(
              idx, ok, torchvision.ops.batched_nms(tb, ts, tid, t), s)))
          trick = tv_boxes._batched_nms_coordinate_trick(tb, ts, tid, t)  # noqa: SLF001
          results.append((f"batched_nms {name} vs the offset trick", compare_lists(
              idx, ok, trick, s)))
        idx, ok = bnms_fn[t](jnp.asarray(b), jnp.asarray(s), jnp.asarray(classes),
                             valid_N=jnp.asarray(valid))
        results.append(("batched_nms classes valid_N", compare_lists(idx, ok, sub[
            torchvision.ops.batched_nms(tb[sub], ts[sub], torch.from_numpy(classes[sub]).long(),
                                        t).numpy()], s)))
        for name, (status, _) in results:
          key = name.split(" ")[0] + (" vs the offset trick" if "trick" in name else "")
          tally.setdefault(key, {}).setdefault(status, 0)
          tally[key][status] += 1
        print(f"seed {seed}, {kind}, threshold {t}: " + "; ".join(
            f"{name} {text}" for name, (_, text) in results))

  # the coder: mmdet's formulas in torch
  rng = np.random.default_rng(100)
  encode_fn = jax.jit(boxes.encode, static_argnums=(2, 3))
  decode_fn = jax.jit(boxes.decode, static_argnums=(2, 3, 4))
  worst_coder_ulps = 0.0
  for means, stds in (((0.0,) * 4, (1.0,) * 4), ((0.0,) * 4, (0.1, 0.1, 0.2, 0.2))):
    p, g = random_boxes(rng, N), random_boxes(rng, N)
    d = np.asarray(encode_fn(jnp.asarray(p), jnp.asarray(g), means, stds))
    want = mmdet_bbox2delta(torch, torch.from_numpy(p), torch.from_numpy(g), means, stds).numpy()
    rows = [(f"encode stds {stds}", d, want)]
    deltas = rng.normal(0, 1.5, size=(N, 8)).astype(np.float32)
    deltas[:100, 2:4] = rng.choice([-8.0, 8.0], size=(100, 2))   # past the clamp
    for max_shape in (None, (800, 1333)):
      got = np.asarray(decode_fn(jnp.asarray(p), jnp.asarray(deltas), means, stds, max_shape))
      want = mmdet_delta2bbox(torch, torch.from_numpy(p), torch.from_numpy(deltas), means, stds,
                              max_shape).numpy()
      rows.append((f"decode (N, 8) stds {stds} max_shape {max_shape}", got, want))
    for name, got, want in rows:
      worst_coder_ulps = max(worst_coder_ulps, ulps(got - want, want))
      print(f"coder {name}: max |ours - mmdet's formulas in torch| {np.abs(got - want).max():.1e}"
            f" ({ulps(got - want, want):.1f} ulp at {np.abs(want).max():.0f}), "
            f"{np.mean(got != want):.2%} not bitwise equal")

  # anchors: mmdet's generator in torch, Mask R-CNN's RPN settings, 1024x1024 and 800x1333 inputs
  anchors_same = True
  for hw in ((1024, 1024), (800, 1333)):
    sizes = [(math.ceil(hw[0] / s), math.ceil(hw[1] / s)) for s in (4, 8, 16, 32, 64)]
    ours = boxes.anchors(sizes)
    theirs = mmdet_anchors(torch, sizes, (4, 8, 16, 32, 64), (8,), (0.5, 1.0, 2.0))
    same = all(np.array_equal(np.asarray(a), t.numpy()) for a, t in zip(ours, theirs))
    anchors_same &= same
    print(f"anchors {hw[0]}x{hw[1]}, levels {sizes}: {sum(len(a) for a in ours)} anchors, "
          f"{'bitwise equal' if same else 'DIFFER'}")

  b = jnp.asarray(random_boxes(np.random.default_rng(7), N))
  s = jnp.asarray(np.random.default_rng(8).uniform(size=N).astype(np.float32))
  nms_fn[0.7](b, s)[0].block_until_ready()
  start = time.perf_counter()
  for _ in range(5):
    nms_fn[0.7](b, s)[0].block_until_ready()
  print(f"our nms, N = {N}, max_out = {N}, jitted: {(time.perf_counter() - start) / 5 * 1e3:.1f} "
        f"ms on {jax.devices()[0].device_kind}")
  print(f"worst |iou - torchvision| {worst_iou:.1e} ({worst_iou_ulps:.1f} ulp at 1); coder worst "
        f"{worst_coder_ulps:.1f} ulp at the values' scale; anchors bitwise equal: {anchors_same}")
  print("index lists: " + "; ".join(f"{key} " + ", ".join(f"{n} {status}" for status, n in
                                                          sorted(counts.items()))
                                    for key, counts in tally.items()))
  exact = all(set(tally[k]) == {"identical"} for k in ("nms",))
  assert exact and "DIFFER" not in tally["batched_nms"] and anchors_same
  assert worst_iou_ulps <= 4 and worst_coder_ulps <= 2


if __name__ == "__main__":
  main()
