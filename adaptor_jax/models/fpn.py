"""FPN (Lin et al. 2017) as mmdetection builds it for Mask R-CNN (mmdet/models/necks/fpn.py with
mask-rcnn_r50_fpn's settings), channels last:

  laterals    a 1x1 convolution (with bias) per backbone stage to `channels`
  top-down    from the coarsest lateral down: each lateral plus the one above it, upsampled to
              its size by nearest neighbour (torch's legacy "nearest": source index
              floor(i * in / out))
  outputs     a 3x3 convolution (with bias) on each; then, for num_outs beyond the stages, a
              max pool of kernel 1 and stride 2 of the last output (add_extra_convs=False):
              P2..P6 at strides 4..64 for a four-stage backbone

No norm, no activation. Weights are Xavier-uniform, biases zero (mmdet's init of the FPN).
"""
import jax.numpy as jnp
from flax import nnx

XAVIER = nnx.initializers.xavier_uniform()


def upsample_nearest(x_BHWC, size):
  """torch.nn.functional.interpolate(mode="nearest", size=size) in channels last: output row i
  reads input row min(floor(i * in / out), in - 1), likewise for columns."""
  out = x_BHWC
  for axis, n_out in zip((1, 2), size):
    n_in = out.shape[axis]
    src = jnp.minimum(jnp.floor(jnp.arange(n_out) * (n_in / n_out)).astype(jnp.int32), n_in - 1)
    out = jnp.take(out, src, axis=axis)
  return out


def _conv(din, dout, kernel, *, dtype, rngs):
  pad = kernel // 2
  return nnx.Conv(din, dout, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                  kernel_init=XAVIER, bias_init=nnx.initializers.zeros, rngs=rngs)


class FPN(nnx.Module):
  """in_channels: the backbone stages' widths; returns num_outs maps of `channels`, the first at
  the first stage's resolution, each next one half the size."""

  def __init__(self, in_channels, channels=256, num_outs=5, *, dtype=jnp.float32,
               rngs: nnx.Rngs):
    if num_outs < len(in_channels):
      raise ValueError(f"FPN: num_outs={num_outs} must be at least the {len(in_channels)} "
                       f"input stages")
    self.lateral_convs = nnx.List([_conv(c, channels, 1, dtype=dtype, rngs=rngs)
                                   for c in in_channels])
    self.fpn_convs = nnx.List([_conv(channels, channels, 3, dtype=dtype, rngs=rngs)
                               for _ in in_channels])
    self.num_outs = num_outs

  def __call__(self, features):
    laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + upsample_nearest(laterals[i],
                                                           laterals[i - 1].shape[1:3])
    outs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)]
    while len(outs) < self.num_outs:  # max_pool2d(kernel 1, stride 2)
      outs.append(outs[-1][:, ::2, ::2])
    return outs
