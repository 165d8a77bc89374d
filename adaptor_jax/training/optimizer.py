"""AdamW with the paper's schedule: linear warm-up, cosine decay, linear lr scaling, clipping,
weight decay only on weight matrices, and frozen params held exactly still.
"""
import jax
import optax
from flax import nnx

from adaptor_jax.models import vmamba

# Params that never decay, besides every 1-D param: SSM constants, biases, layer-scale style gains
# and tokens (as VMamba's and Vim's no_weight_decay lists, and timm's 1-D rule).
NO_DECAY = ("A_log", "A_b_log", "D", "D_b", "dt_bias", "gamma", "cls_token", "pos_embed")


def schedule(config, steps_per_epoch):
  """lr per step: warm-up from warmup_lr to lr, then cosine to min_lr, all scaled by
  batch_size / lr_base_batch."""
  scale = config.batch_size / config.lr_base_batch
  total = max(1, round(config.epochs * steps_per_epoch))
  warmup = round(config.warmup_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(
      init_value=config.warmup_lr * scale, peak_value=config.lr * scale, warmup_steps=warmup,
      decay_steps=total, end_value=config.min_lr * scale)


def decay_mask(params):
  """True where weight decay applies: params of 2+ dims that are not biases or SSM constants."""
  def one(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    return x.ndim >= 2 and not name.endswith("bias") and name not in NO_DECAY
  return jax.tree_util.tree_map_with_path(one, params)


def make(config, steps_per_epoch, trainable=None):
  """The optax transformation. `trainable`: a pytree of bools like the params (None: all train);
  the others get exactly zero updates and no optimizer state."""
  lr = schedule(config, steps_per_epoch)
  tx = optax.chain(
      optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
      optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                  mask=decay_mask))
  if trainable is None:
    return tx
  return optax.multi_transform({True: tx, False: optax.set_to_zero()}, trainable)


def trainable_mask(model, head_only=False):
  """Pure-dict mask of the params that train: None (all) except in the adaptor form and
  with head_only (linear probing: the classifier only)."""
  if isinstance(model, vmamba.VSSM) and (head_only or model.form == "adaptor"):
    return nnx.to_pure_dict(vmamba.trainable_mask(model, head_only=head_only))
  return None
