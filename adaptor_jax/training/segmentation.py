"""Semantic segmentation: what the trainer needs of it (tasks.py names the parts), as
mmsegmentation trains and evaluates UperNet on ADE20K.

  batch     train {"image": uint8 (B, S, S, 3), "label": uint8 (B, S, S)}, 255 ignored; eval
            {"views": per view its "image", "rows" / "cols" (the resize of the logits to each
            original label map, as matrices), "label" at the original size, "mask" (padding)}
            (data/segmentation.py)
  train     on device: normalisation; loss: pixel cross-entropy of the logits resized
            (bilinear) to the labels, the ignored pixels counting 0 in a mean over all (mmseg's
            CrossEntropyLoss, avg_non_ignore=False), plus 0.4 x the auxiliary head's
  eval      the argmax of the logits resized to the labels (several views: of their mean
            softmax); per class, the pixels of prediction and label, of their intersection;
            summed over the split (mmseg's IoUMetric): mIoU (mean over classes present in
            prediction or label), mAcc, aAcc; miou picks the best checkpoint
"""
import jax
import jax.numpy as jnp
import numpy as np

from adaptor_jax.data import augment, pipeline, segmentation
from adaptor_jax.data.segtransforms import IGNORE
from adaptor_jax.models import common

NAME = "segmentation"
EVAL_KEYS = ("views", "label", "mask")
SHOWN = (("mIoU", "miou"), ("mAcc", "macc"), ("aAcc", "aacc"))  # an evaluation's line
BEST = "miou"
AUX_WEIGHT = 0.4


def train_batch_spec(batch_size, image_size):
  """{key: (shape, dtype)} of a train batch."""
  return dict(image=((batch_size, image_size, image_size, 3), jnp.uint8),
              label=((batch_size, image_size, image_size), jnp.uint8))


def num_classes(data):
  return len(class_names(data))


def class_names(data):
  """The dataset's class names (its metadata), without "other" when reduce_zero_label."""
  return list(pipeline.open_builder(data).info.metadata["class_names"])


def train_iterator(data, *, batch_size, seed):
  return pipeline.train_iterator(data, batch_size=batch_size, seed=seed,
                                 record=segmentation.TrainRecord)


def eval_iterator(data, *, batch_size, split=None):
  return pipeline.eval_iterator(data, split=split, batch_size=batch_size,
                                record=segmentation.EvalRecord)


def train_inputs(key, batch, data, num_classes):
  """(normalised images, int32 labels (B, S, S))."""
  del key, num_classes
  return augment.eval_batch(batch["image"], data), batch["label"].astype(jnp.int32)


def _pixel_loss(logits, labels):
  """mmseg's cross-entropy: logits resized to the labels, ignored pixels 0, mean over all."""
  logits = common.resize_bilinear(logits, labels.shape[1:3]).astype(jnp.float32)
  valid = labels != IGNORE
  safe = jnp.where(valid, labels, 0)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]
  return jnp.where(valid, nll, 0.0).mean()


def loss(outputs, targets):
  logits, aux = outputs
  return _pixel_loss(logits, targets) + AUX_WEIGHT * _pixel_loss(aux, targets)


def eval_counts(model, batch, data):
  """{"intersect", "pred", "label"}: pixels per class, and "n" images, of a batch; ignored and
  padded pixels (and padded images) count in none. The prediction is the argmax of each view's
  logits resized to the original labels, or with several views (multi-scale, flip) of the mean
  of their softmax (mmseg's SegTTAModel)."""
  views = batch["views"]
  scores = None
  for view in views:
    logits = model(augment.eval_batch(view["image"], data)).astype(jnp.float32)
    full = jnp.einsum("bih,bhwc,bjw->bijc", view["rows"], logits, view["cols"])
    full = full if len(views) == 1 else jax.nn.softmax(full, axis=-1)
    scores = full if scores is None else scores + full
  return counts(scores, batch["label"], batch["mask"])


def counts(scores, labels, mask):
  """Per-class pixel counts of the argmax of scores (B, H, W, classes) against labels."""
  pred, label = jnp.argmax(scores, -1), labels.astype(jnp.int32)
  valid = (label != IGNORE) & mask[:, None, None]
  classes = scores.shape[-1]

  def per_class(values, where):
    return jnp.zeros((classes,), jnp.int32).at[jnp.where(where, values, 0)].add(
        where.astype(jnp.int32))
  return dict(intersect=per_class(label, valid & (pred == label)),
              pred=per_class(pred, valid), label=per_class(label, valid),
              n=jnp.sum(mask))


def metrics(counts):
  """{"miou", "macc", "aacc", "iou" and "acc": per class (None where absent), "n"} of the summed
  counts."""
  intersect, pred, label = (np.asarray(counts[k], np.float64)
                            for k in ("intersect", "pred", "label"))
  union = pred + label - intersect
  with np.errstate(invalid="ignore", divide="ignore"):
    iou, acc = intersect / union, intersect / label
  present = union > 0
  per_class = lambda values: [None if np.isnan(v) else float(v) for v in values]
  return dict(miou=float(np.nanmean(iou)) if present.any() else 0.0,
              macc=float(np.nanmean(acc)) if (label > 0).any() else 0.0,
              aacc=float(intersect.sum() / max(label.sum(), 1)),
              iou=per_class(iou), acc=per_class(acc), n=int(counts["n"]))
