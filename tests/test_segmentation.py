"""The segmentation task (adaptor_jax/training/segmentation.py, with data/segmentation.py's
evaluation inputs) against NumPy oracles: the pixel loss as mmseg's CrossEntropyLoss computes it,
the per-class counts as the confusion matrix of the logits resized to each original label map,
mmseg's metrics of them; and the demo's recipe through train.py and eval.py on a tiny model."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataset_archives
import train_cases as tc
from test_segtransforms import np_bilinear
from adaptor_jax.data import (ade20k, config as data_config, pipeline, segmentation as data_seg,
                              segtransforms)
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


def _eval_batch(rng, classes, shapes, canvas, flips=(False,)):
  """An eval batch as data/segmentation.EvalRecord lays it out: per view (a flip of `flips`)
  the rows and cols of images rescaled to `shapes`' resized sizes and padded to `canvas`; labels
  at their original sizes; the last image padding."""
  hc, wc = canvas
  lh, lw = max(s[0][0] for s in shapes), max(s[0][1] for s in shapes)
  views = [dict(image=np.zeros((len(shapes), hc, wc, 3), np.uint8),
                rows=np.zeros((len(shapes), lh, hc // 4), np.float32),
                cols=np.zeros((len(shapes), lw, wc // 4), np.float32)) for _ in flips]
  batch = dict(views=views, label=np.full((len(shapes), lh, lw), IGNORE, np.uint8),
               mask=np.array([True] * (len(shapes) - 1) + [False]))
  for b, ((h0, w0), (h, w)) in enumerate(shapes):
    label = rng.integers(0, classes, (h0, w0)).astype(np.uint8)
    label[: h0 // 3, : w0 // 3] = IGNORE
    batch["label"][b, :h0, :w0] = label
    for view, flip in zip(views, flips):
      view["rows"][b, :h0] = data_seg.logit_resize(h0, h, hc)
      view["cols"][b, :w0] = data_seg.logit_resize(w0, w, wc, flip)
  return batch


def _fake_model(outputs):
  """A model whose calls return `outputs` in turn."""
  it = iter(outputs)
  return lambda x: jnp.asarray(next(it))


def _confusion(classes, labels, preds):
  confusion = np.zeros((classes, classes), np.int64)
  for label, pred in zip(labels, preds):
    keep = label != IGNORE
    confusion += np.bincount(label[keep].astype(np.int64) * classes + pred[keep],
                             minlength=classes ** 2).reshape(classes, classes)
  return confusion


@pytest.mark.parametrize("flips", [(False,), (False, True)])
def test_counts_are_the_confusion_matrix_of_logits_resized_as_mmseg_does(flips):
  """The logits of a padded canvas: the valid part resized to the rescaled image, flipped back
  for a flipped view, then to the original labels (two bilinear resizes); with several views
  the argmax of their mean softmax (mmseg's SegTTAModel). Ignored pixels and the padding image
  count nowhere."""
  rng, classes, canvas = np.random.default_rng(1), 5, (32, 40)
  shapes = [((23, 37), (20, 32)), ((30, 17), (32, 18)), ((11, 13), (16, 20))]
  batch = _eval_batch(rng, classes, shapes, canvas, flips)
  logits = [rng.normal(size=(3, 8, 10, classes)).astype(np.float32) for _ in flips]
  got = seg.eval_counts(_fake_model(logits), jax.tree.map(jnp.asarray, batch),
                        data_config.default_data_config())
  labels, preds = [], []
  for b, ((h0, w0), (h, w)) in enumerate(shapes[:-1]):
    scores = 0
    for view_logits, flip in zip(logits, flips):
      full = np_bilinear(view_logits[b, : -(-h // 4), : -(-w // 4)], h, w)
      full = np_bilinear(full[:, ::-1] if flip else full, h0, w0)
      e = np.exp(full - full.max(-1, keepdims=True))
      scores = scores + (full if len(flips) == 1 else e / e.sum(-1, keepdims=True))
    labels.append(batch["label"][b, :h0, :w0])
    preds.append(scores.argmax(-1))
  confusion = _confusion(classes, labels, preds)
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
  assert {"miou", "macc", "aacc"} <= set(result) and "iou" not in result
  assert result["per_class"] == os.path.join(workdir, "eval", "step_30_validation.json")
  with open(result["per_class"]) as f:
    per_class = json.load(f)
  assert len(per_class["classes"]) == len(per_class["iou"]) == len(per_class["acc"]) == 11
  assert per_class["iou"] == final["eval/iou"]


def test_eval_multiscale_is_the_mean_of_twelve_views(seg_run):
  """eval.py --multiscale: mmseg's tta_pipeline (6 ratios of the original size, each flipped);
  its own per-class file."""
  workdir, _, d = seg_run
  code, printed = tc.run([sys.executable, os.path.join(tc.REPO, "eval.py"),
                          f"--workdir={workdir}", "--multiscale"], str(d / "eval_ms"),
                         env=tc.env())
  assert code == 0, tc.tail(str(d / "eval_ms.err"))
  result = json.loads(printed.strip().splitlines()[-1])
  assert 0 <= result["miou"] <= 1 and result["n"] == 300
  assert result["per_class"].endswith("step_30_validation_multiscale.json")


_SIZES = [(33, 47, "rgb"), (26, 35, "gray"), (50, 30, "rgb"), (40, 44, "ignored"), (20, 70, "rgb")]


@pytest.fixture(scope="module")
def ade_cfg(tmp_path_factory):
  """A tiny ADEChallengeData2016.zip of images of five sizes in its validation split, built."""
  d = tmp_path_factory.mktemp("ade")
  made = dataset_archives.write_ade20k(d / "ADEChallengeData2016.zip", np.random.default_rng(3),
                                       sizes={"train": _SIZES[:1], "validation": _SIZES})
  ade20k.build(d / "ADEChallengeData2016.zip", d / "tfds")
  cfg = data_config.default_data_config()
  cfg.update(dict(name="ade20k", data_dir=str(d / "tfds"), seg_scale=(64, 32), eval_bucket=16,
                  num_workers=0))
  by_name = {f"{stem}.jpg": (image, labels) for stem, image, labels in made["validation"]}
  source = pipeline.open_source(cfg, "validation")
  originals = [by_name[source[i]["file_name"].decode()] for i in range(len(source))]
  return cfg, originals


def _eval_batches(cfg, process_index, process_count, batch_size=2):
  return list(pipeline.eval_iterator(cfg, batch_size=batch_size, process_index=process_index,
                                     process_count=process_count, with_index=True,
                                     record=data_seg.EvalRecord))


@pytest.mark.parametrize("ratios,flip", [((), False), ((0.5, 1.25), True)])
def test_eval_groups_images_of_many_sizes_by_canvas(ade_cfg, ratios, flip):
  """Every record once over two processes, which yield the same sequence of batch shapes; in a
  batch one canvas per view. Per record and view: the image resized (mmseg's Resize: to fit
  seg_scale, or each ratio of the original size) and flipped, zero padding; the labels as
  stored (reduce_zero_label), padded with the ignore label; rows and cols the logits' resize."""
  cfg, originals = ade_cfg
  cfg = cfg.copy_and_resolve_references()
  cfg.update(dict(eval_ratios=ratios, eval_flip=flip))
  runs = [_eval_batches(cfg, k, 2) for k in range(2)]
  shapes = [[jax.tree.map(np.shape, b) for b in run] for run in runs]
  assert shapes[0] == shapes[1]
  seen = sorted(int(i) for run in runs for b in run for i, m in zip(b["index"], b["mask"]) if m)
  assert seen == list(range(len(originals)))
  canvases = {tuple(v["image"].shape[1:3] for v in b["views"]) for b in runs[0]}
  assert len(canvases) >= 3  # the five sizes fall in several canvases
  for b in (b for run in runs for b in run):
    for row, index in enumerate(b["index"]):
      if index < 0:
        assert not b["mask"][row]
        continue
      image, labels = originals[index]
      want = segtransforms.labels(labels, True)
      lh, lw = want.shape
      np.testing.assert_array_equal(b["label"][row, :lh, :lw], want)
      assert (b["label"][row, lh:] == IGNORE).all() and (b["label"][row, :, lw:] == IGNORE).all()
      sizes = ([segtransforms.rescale_size(lh, lw, cfg.seg_scale)] if not ratios else
               [segtransforms.rescale_size(lh, lw, (int(lw * r + 0.5), int(lh * r + 0.5)))
                for r in ratios])
      views = [(h, w, f) for h, w in sizes for f in ((False, True) if flip else (False,))]
      assert len(b["views"]) == len(views)
      for view, (h, w, f) in zip(b["views"], views):
        resized = segtransforms.resize_bilinear(image, h, w)
        got = view["image"][row]
        np.testing.assert_array_equal(got[:h, :w], resized[:, ::-1] if f else resized)
        assert not got[h:].any() and not got[:, w:].any()
        np.testing.assert_array_equal(view["rows"][row, :lh],
                                      data_seg.logit_resize(lh, h, got.shape[0]))
        np.testing.assert_array_equal(view["cols"][row, :lw],
                                      data_seg.logit_resize(lw, w, got.shape[1], f))


def test_eval_bucket_1_is_whole_image_inference(ade_cfg):
  """eval_bucket=1 pads nothing: each view is the resized image itself."""
  cfg, originals = ade_cfg
  cfg = cfg.copy_and_resolve_references()
  cfg.eval_bucket = 1
  for b in _eval_batches(cfg, 0, 1, batch_size=1):
    lh, lw = originals[int(b["index"][0])][1].shape
    assert b["views"][0]["image"].shape[1:3] == segtransforms.rescale_size(lh, lw, cfg.seg_scale)


def test_a_converted_checkpoint_evaluates_with_the_config_of_its_data(seg_run):
  """Official weights as the importer writes them (here: the run's model saved by
  convert/state_dict.save, its BatchNorm statistics too) evaluate with eval.py --config, to the
  run's own numbers; without --config, one line says what to give."""
  from adaptor_jax import load_model
  from adaptor_jax.convert import state_dict
  workdir, _, d = seg_run
  model, config = load_model(workdir)
  state_dict.save(model, config.model, str(d / "converted"))
  flags = [f"--config={os.path.join(tc.REPO, 'configs', 'seg_demo.py')}",
           f"--config.data.data_dir={d / 'data'}",
           "--config.model_overrides.dims=(8, 16, 16, 16)",
           "--config.model_overrides.depths=(1, 1, 1, 1)",
           "--config.model_overrides.channels=16", "--config.model_overrides.aux_channels=8"]
  eval_py = [sys.executable, os.path.join(tc.REPO, "eval.py"), f"--workdir={d / 'converted'}"]
  code, printed = tc.run(eval_py + flags, str(d / "eval_conv"), env=tc.env())
  assert code == 0, tc.tail(str(d / "eval_conv.err"))
  result = json.loads(printed.strip().splitlines()[-1])
  final = [m for m in tc.read_metrics(workdir) if m["step"] == 30 and "eval/miou" in m][-1]
  assert result["miou"] == pytest.approx(final["eval/miou"], abs=1e-6)
  assert result["per_class"] == str(d / "converted" / "eval" / "validation.json")
  code, _ = tc.run(eval_py, str(d / "eval_noconf"), env=tc.env())
  err = tc.tail(str(d / "eval_noconf.err"))
  assert code != 0 and "is a converted upernet_b1, not a run: give the config" in err, err
  assert "Traceback" not in err
