"""Padding against whole-image inference in segmentation's evaluation.

A batch of the eval split shares a canvas: images are padded to multiples of
config.data.eval_bucket (data/segmentation.py). The scans run over the padding too, so the
logits of the valid region change with it. This runs a trained run's model on its eval split
with the images rescaled to fit --seg_scale (pick one whose sizes are not multiples of the
buckets), at eval_bucket 1 (no padding: whole-image inference, as mmseg's) and at each of
--buckets, and reports per bucket the mIoU and the share of labelled pixels whose prediction
differs from whole-image inference.

python benchmarks/seg_padding.py --workdir=/tmp/seg_demo --seg_scale=56,56 --buckets=32,64,128
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import results_file
from adaptor_jax.data import augment, pipeline, segmentation as data_seg
from adaptor_jax.data.segtransforms import IGNORE
from adaptor_jax.training import loader, segmentation


def predictions(model, cfg, batch_size):
  """{record index: (predicted classes, labels)} at the original size, and the summed counts."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def predict(state, batch):
    view = batch["views"][0]
    logits = nnx.merge(graphdef, state)(augment.eval_batch(view["image"], cfg))
    full = jnp.einsum("bih,bhwc,bjw->bijc", view["rows"], logits.astype(jnp.float32),
                      view["cols"])
    return full.argmax(-1), segmentation.counts(full, batch["label"], batch["mask"])

  preds, totals = {}, None
  for batch in pipeline.eval_iterator(cfg, batch_size=batch_size, with_index=True,
                                      record=data_seg.EvalRecord):
    pred, counts = jax.device_get(predict(state, {k: batch[k] for k in ("views", "label",
                                                                        "mask")}))
    totals = counts if totals is None else jax.tree.map(np.add, totals, counts)
    for row, index in enumerate(batch["index"]):
      if batch["mask"][row]:
        preds[int(index)] = (pred[row], batch["label"][row])
  return preds, totals


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a segmentation run (train.py)")
  parser.add_argument("--seg_scale", default="56,56", help="rescale to fit (long, short)")
  parser.add_argument("--buckets", default="32,64,128")
  parser.add_argument("--batch_size", type=int, default=50)
  parser.add_argument("--out", default=os.path.join(results_file.RESULTS, "seg-padding-cpu.json"))
  args = parser.parse_args()
  model, config = loader.load_model(args.workdir)
  cfg = config.data
  cfg.seg_scale = tuple(int(v) for v in args.seg_scale.split(","))
  results = results_file.load(args.out)
  whole = None
  for bucket in [1] + [int(b) for b in args.buckets.split(",")]:
    cfg.eval_bucket = bucket
    preds, counts = predictions(model, cfg, args.batch_size)
    whole = whole or preds
    changed = labelled = 0
    for index, (pred, label) in preds.items():
      base = whole[index][0]  # at the original size: bucket 1 pads no labels
      pred, label = pred[:base.shape[0], :base.shape[1]], label[:base.shape[0], :base.shape[1]]
      valid = label != IGNORE
      changed += int((pred[valid] != base[valid]).sum())
      labelled += int(valid.sum())
    metrics = segmentation.metrics(counts)
    row = dict(eval_bucket=bucket, seg_scale=list(cfg.seg_scale), images=len(preds),
               miou=metrics["miou"], aacc=metrics["aacc"], changed_pixels=changed / labelled)
    results["rows"][f"{os.path.basename(os.path.normpath(args.workdir))}|{args.seg_scale}|"
                    f"bucket{bucket}"] = row
    print(json.dumps(row), flush=True)
    results_file.save(args.out, results, device=str(jax.devices()[0]))


if __name__ == "__main__":
  main()
