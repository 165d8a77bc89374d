"""The segmentation task (adaptor_jax/training/segmentation.py, with data/segmentation.py's
evaluation inputs) against NumPy oracles: the pixel loss as mmseg's CrossEntropyLoss computes it,
the per-class counts as the confusion matrix of the logits resized to each original label map,
mmseg's metrics of them; and the demo's recipe through train.py and eval.py on a tiny model."""
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import train_cases as tc
from test_segtransforms import np_bilinear
from adaptor_jax.data import segmentation as data_seg
from adaptor_jax.data.segtransforms import IGNORE
from adaptor_jax.training import segmentation as seg


def np_pixel_loss(logits_HWC, labels_HW):
  """Cross-entropy per pixel of the upsampled logits, ignored pixels 0, mean over all pixels."""
  z = np_bilinear(logits_HWC, *labels_HW.shape)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  valid = labels_HW != IGNORE
  nll = -np.take_along_axis(logp, np.where(valid, labels_HW, 0)[..., None], -1)[..., 0]
  return np.where(valid, nll, 0.0).sum(), labels_HW.size


def test_loss_is_mmsegs_cross_entropy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
  aux = rng.normal(size=(2, 1, 2, 6)).astype(np.float32)
  labels = rng.integers(0, 6, (2, 16, 20)).astype(np.int32)
  labels[0, :5] = IGNORE
  labels[1] = IGNORE  # an all-ignored map counts 0 in the mean
  got = float(seg.loss((jnp.asarray(logits), jnp.asarray(aux)), jnp.asarray(labels)))

  def mean(z):
    total = [np_pixel_loss(z[b], labels[b]) for b in range(2)]
    return sum(t for t, _ in total) / sum(n for _, n in total)
  want = mean(logits) + seg.AUX_WEIGHT * mean(aux)
  assert abs(got - want) <= 1e-5 * abs(want)


def _eval_batch(rng, classes, shapes, canvas):
  """An eval batch as data/segmentation.EvalRecord lays it out: images rescaled to `shapes`'
  resized sizes and padded to `canvas`; labels at their original sizes; the last image padding."""
  hc, wc = canvas
  lh, lw = max(s[0][0] for s in shapes), max(s[0][1] for s in shapes)
  batch = dict(label=np.full((len(shapes), lh, lw), IGNORE, np.uint8),
               rows=np.zeros((len(shapes), lh, hc // 4), np.float32),
               cols=np.zeros((len(shapes), lw, wc // 4), np.float32),
               mask=np.array([True] * (len(shapes) - 1) + [False]))
  for b, ((h0, w0), (h, w)) in enumerate(shapes):
    label = rng.integers(0, classes, (h0, w0)).astype(np.uint8)
    label[: h0 // 3, : w0 // 3] = IGNORE
    batch["label"][b, :h0, :w0] = label
    batch["rows"][b, :h0] = data_seg.logit_resize(h0, h, hc)
    batch["cols"][b, :w0] = data_seg.logit_resize(w0, w, wc)
  return batch


def test_counts_are_the_confusion_matrix_of_logits_resized_as_mmseg_does():
  """The logits of a padded canvas: the valid part resized to the rescaled image, then to the
  original labels (two bilinear resizes); ignored pixels and the padding image count nowhere."""
  rng, classes, canvas = np.random.default_rng(1), 5, (32, 40)
  shapes = [((23, 37), (20, 32)), ((30, 17), (32, 18)), ((11, 13), (16, 20))]
  batch = _eval_batch(rng, classes, shapes, canvas)
  logits = rng.normal(size=(3, 8, 10, classes)).astype(np.float32)
  got = seg.eval_counts(jnp.asarray(logits), {k: jnp.asarray(v) for k, v in batch.items()})
  confusion = np.zeros((classes, classes), np.int64)
  for b, ((h0, w0), (h, w)) in enumerate(shapes[:-1]):
    valid = logits[b, : -(-h // 4), : -(-w // 4)]
    pred = np_bilinear(np_bilinear(valid, h, w), h0, w0).argmax(-1)
    label = batch["label"][b, :h0, :w0].astype(np.int64)
    keep = label != IGNORE
    confusion += np.bincount(label[keep] * classes + pred[keep],
                             minlength=classes ** 2).reshape(classes, classes)
  np.testing.assert_array_equal(got["intersect"], np.diag(confusion))
  np.testing.assert_array_equal(got["label"], confusion.sum(1))
  np.testing.assert_array_equal(got["pred"], confusion.sum(0))
  assert int(got["n"]) == 2


def test_metrics_are_mmsegs():
  """IoU and accuracy per class; mIoU and mAcc their means over the classes present (NaN
  otherwise, as mmseg's IoUMetric), aAcc all pixels."""
  counts = dict(intersect=np.array([8, 0, 3, 0]), pred=np.array([10, 2, 3, 0]),
                label=np.array([9, 1, 6, 0]), n=np.array(4))
  got = seg.metrics(counts)
  iou = [8 / 11, 0 / 3, 3 / 6]
  assert got["iou"][:3] == pytest.approx(iou) and got["iou"][3] is None
  assert got["miou"] == pytest.approx(np.mean(iou))
  assert got["macc"] == pytest.approx(np.mean([8 / 9, 0, 3 / 6]))
  assert got["aacc"] == pytest.approx(11 / 16) and got["n"] == 4


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
  """configs/seg_demo.py on a tiny UperNet for 30 steps (its dataset built on first use)."""
  d = tmp_path_factory.mktemp("seg")
  workdir = str(d / "run")
  cmd = [sys.executable, os.path.join(tc.REPO, "train.py"),
         f"--config={os.path.join(tc.REPO, 'configs', 'seg_demo.py')}", f"--workdir={workdir}",
         f"--config.data.data_dir={d / 'data'}", f"--config.compile_cache={d / 'cache'}",
         "--config.max_steps=30", "--config.log_every=5", "--config.eval_every=30",
         "--config.model_overrides.dims=(8, 16, 16, 16)",
         "--config.model_overrides.depths=(1, 1, 1, 1)",
         "--config.model_overrides.channels=16", "--config.model_overrides.aux_channels=8"]
  code, out = tc.run(cmd, str(d / "train"), env=tc.env())
  assert code == 0, tc.tail(str(d / "train.err"))
  return workdir, out, d


def test_the_demo_recipe_trains_and_eval_reproduces_its_evaluation(seg_run):
  workdir, out, d = seg_run
  assert "eval at step 30: mIoU " in out, out
  metrics = tc.read_metrics(workdir)
  losses = tc.train_losses(metrics)
  assert losses[30] < losses[5], losses
  final = [m for m in metrics if m["step"] == 30 and "eval/miou" in m][-1]
  assert len(final["eval/iou"]) == 11
  code, printed = tc.run([sys.executable, os.path.join(tc.REPO, "eval.py"),
                          f"--workdir={workdir}"], str(d / "eval"), env=tc.env())
  assert code == 0, tc.tail(str(d / "eval.err"))
  result = json.loads(printed.strip().splitlines()[-1])
  assert result["miou"] == pytest.approx(final["eval/miou"], abs=1e-6)
  assert {"miou", "macc", "aacc"} <= set(result)
