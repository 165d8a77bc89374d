"""AdamW with the paper's schedule: linear warm-up, cosine decay, linear lr scaling, clipping,
weight decay only where the models declare it (registry.decay_mask: weight matrices), and
frozen params held exactly still.
"""
import optax

from adaptor_jax.models import registry


def schedule(config, steps_per_epoch):
  """lr per step: linear warm-up from warmup_lr to lr, then config.schedule down to min_lr:
  cosine, or poly (power 1: linear, mmseg's PolyLR), all scaled by batch_size /
  lr_base_batch."""
  scale = config.batch_size / config.lr_base_batch
  total = max(1, round(config.epochs * steps_per_epoch))
  warmup = round(config.warmup_epochs * steps_per_epoch)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=config.warmup_lr * scale, peak_value=config.lr * scale, warmup_steps=warmup,
        decay_steps=total, end_value=config.min_lr * scale)
  return optax.join_schedules([
      optax.linear_schedule(config.warmup_lr * scale, config.lr * scale, warmup),
      optax.polynomial_schedule(config.lr * scale, config.min_lr * scale, power=1,
                                transition_steps=max(1, total - warmup))], [warmup])


def make(config, steps_per_epoch, trainable=None):
  """The optax transformation. `trainable`: a pytree of bools like the params (None: all train);
  the others get exactly zero updates and no optimizer state."""
  lr = schedule(config, steps_per_epoch)
  tx = optax.chain(
      optax.clip_by_global_norm(config.grad_clip) if config.grad_clip else optax.identity(),
      optax.adamw(lr, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                  mask=registry.decay_mask))
  if trainable is None:
    return tx
  return optax.multi_transform({True: tx, False: optax.set_to_zero()}, trainable)
