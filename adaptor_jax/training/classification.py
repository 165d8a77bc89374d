"""Image classification: what the trainer needs of it (tasks.py names the parts).

  batch     train {"image": uint8 (B, S, S, 3), "label": int32 (B,)}; eval adds "mask" (padding)
  train     on device: random erasing, mixup / cutmix into soft targets (augment.train_batch);
            loss: softmax cross-entropy of the logits
  eval      top-1 and top-5 hits and the images counted per batch, summed over the split;
            metrics top1, top5 (fractions) and n; top1 picks the best checkpoint
"""
import jax
import jax.numpy as jnp
import optax

from adaptor_jax.data import augment, pipeline

NAME = "classification"
EVAL_KEYS = ("image", "label", "mask")
SHOWN = (("top-1", "top1"), ("top-5", "top5"))  # an evaluation's line: label, metric
BEST = "top1"  # the metric that picks the best checkpoint (higher is better)


def train_batch_spec(batch_size, image_size):
  """{key: (shape, dtype)} of a train batch."""
  return dict(image=((batch_size, image_size, image_size, 3), jnp.uint8),
              label=((batch_size,), jnp.int32))


def num_classes(data):
  return pipeline.num_classes(data)


def class_names(data):
  return pipeline.class_names(data)


def train_iterator(data, *, batch_size, seed):
  return pipeline.train_iterator(data, batch_size=batch_size, seed=seed)


def eval_iterator(data, *, batch_size, split=None):
  return pipeline.eval_iterator(data, split=split, batch_size=batch_size)


def train_inputs(key, batch, data, num_classes):
  """(images float (B, S, S, 3), soft targets (B, classes)) of a train batch, on device."""
  return augment.train_batch(key, batch["image"], batch["label"], data, num_classes)


def loss(outputs, targets):
  """The mean softmax cross-entropy of logits (B, classes) against soft targets."""
  return optax.softmax_cross_entropy(outputs.astype(jnp.float32), targets).mean()


def eval_counts(model, batch, data):
  """{"top1", "top5", "n"} of a batch; padded examples (mask False) count in none."""
  logits = model(augment.eval_batch(batch["image"], data)).astype(jnp.float32)
  labels, mask = batch["label"], batch["mask"]
  topk = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  hit = topk == labels[:, None]
  return dict(top1=jnp.sum(hit[:, 0] & mask), top5=jnp.sum(hit.any(-1) & mask), n=jnp.sum(mask))


def metrics(counts):
  """{"top1", "top5", "n"} of the counts summed over a split."""
  n = int(counts["n"])
  return dict(top1=int(counts["top1"]) / max(n, 1), top5=int(counts["top5"]) / max(n, 1), n=n)
