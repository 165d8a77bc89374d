"""Pieces every model file shares: logical axis names, initialisers, LayerNorm, the named ops.

Params carry logical axis names (`nnx.with_partitioning` metadata, not sharded at creation) so the
training code can map them onto its mesh:
  embed   model width C                     mlp      MLP hidden width
  inner   SS2D / Mamba inner width Di       classes  classifier outputs
  route   the four SS2D scan routes         None     never sharded (small axes)
Ten ops are jitted under fixed names (`layer_norm`, `global_avg_pool`, `batch_norm`,
`resize_bilinear`, `adaptive_avg_pool`, `selective_scan`, `memory_read`, `learned_read`,
`dilated_dwconvs`, `depthwise_conv3x3`) so the FLOP counter (counting.py) can find them in a
traced model and count them like fvcore does.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels


def logical(init, *names):
  """`init` with logical axis names; values are created unsharded (a mesh is not needed)."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def annotated(value, *names):
  """An `nnx.Param` holding `value` (float32), annotated with logical axis `names`."""
  return nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=names, eager_sharding=False)


def param(rngs, init, shape, *names):
  """An `nnx.Param` of `shape` drawn from `init`, annotated with logical axis `names`."""
  return annotated(init(rngs.params(), shape, jnp.float32), *names)


trunc_normal = nnx.initializers.truncated_normal(0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
zeros = nnx.initializers.zeros


def uniform(scale):
  """U(-scale, scale)."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -scale, scale)


def fan_in_uniform(fan_in):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv weights and biases."""
  return uniform(1.0 / math.sqrt(fan_in))


def gelu(x):
  return jax.nn.gelu(x, approximate=False)


@jax.jit
def layer_norm(x, scale, bias, eps=1e-5):
  """LayerNorm over the last axis, statistics in float32, result in x.dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias
  return y.astype(x.dtype)


@jax.jit
def global_avg_pool(x_BHWC):
  return x_BHWC.mean(axis=(1, 2))


@jax.jit
def batch_norm(x, mean, var, scale, bias, eps=1e-5):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32, result in
  x.dtype (the named op fvcore counts as 2 per element, an affine BatchNorm in eval mode)."""
  y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + eps) * scale + bias
  return y.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("size",))
def resize_bilinear(x_BHWC, size):
  """Bilinear resize of (B, H, W, C) to `size` (H', W') as PyTorch's F.interpolate with
  align_corners=False: half-pixel centres, no antialiasing when shrinking (fvcore counts it
  as 4 per output element)."""
  if tuple(size) == x_BHWC.shape[1:3]:
    return x_BHWC
  shape = (x_BHWC.shape[0], *size, x_BHWC.shape[3])
  return jax.image.resize(x_BHWC, shape, "bilinear", antialias=False).astype(x_BHWC.dtype)


def _pool_matrix(n, bins):
  """(bins, n): row i averages [floor(i n / bins), ceil((i + 1) n / bins)), PyTorch's
  AdaptiveAvgPool bins (they overlap when bins does not divide n)."""
  m = np.zeros((bins, n), np.float32)
  for i in range(bins):
    start, end = (i * n) // bins, -((-(i + 1) * n) // bins)
    m[i, start:end] = 1.0 / (end - start)
  return m


@functools.partial(jax.jit, static_argnames=("bins",))
def adaptive_avg_pool(x_BHWC, bins):
  """PyTorch's AdaptiveAvgPool2d(bins) of (B, H, W, C): (B, bins, bins, C) (1 per input
  element, as fvcore counts it)."""
  _, H, W, _ = x_BHWC.shape
  ph, pw = _pool_matrix(H, bins), _pool_matrix(W, bins)
  y = jnp.einsum("ih,bhwc,jw->bijc", ph, x_BHWC.astype(jnp.float32), pw)
  return y.astype(x_BHWC.dtype)


def _stencil_taps(dilations):
  """The (n, a, b) kernel entries that are not a centre, and their (row, column) offsets."""
  return [(n, a, b, (a - 1) * d, (b - 1) * d) for n, d in enumerate(dilations)
          for a in range(3) for b in range(3) if (a, b) != (1, 1)]


def _stencil(x_BHWD, k_N33D, dilations, sign):
  """sum over taps of k * x shifted by sign * offset (zero outside), plus the centre taps."""
  _, H, W, _ = x_BHWD.shape
  P = max(dilations)
  x_pad = jnp.pad(x_BHWD, [(0, 0), (P, P), (P, P), (0, 0)])
  out = x_BHWD * k_N33D[:, 1, 1].sum(0)
  for n, a, b, dy, dx in _stencil_taps(dilations):
    top, left = P + sign * dy, P + sign * dx
    out = out + x_pad[:, top:top + H, left:left + W] * k_N33D[n, a, b]
  return out


@functools.partial(jax.jit, static_argnames=("dilations",))
def dilated_dwconvs(y_BHWD, kernel_N33D, bias_ND, dilations):
  """sum_n DWConv3x3(y, kernel[n], dilation=dilations[n], zero "same" padding) + bias[n]: the
  N depthwise convolutions as one stencil of 1 + 8N shifted multiply-adds over a zero-padded y
  (the N centre taps share one), which XLA fuses into one pass. Its backward is the mirrored
  stencil for dy and one product-sum per tap for the kernel. Products accumulate in float32;
  the result has y's dtype. On TPU it is one depthwise convolution instead (_dwconv_merged)."""
  return jax.lax.platform_dependent(
      y_BHWD, kernel_N33D, bias_ND, tpu=functools.partial(_dwconv_merged, dilations=dilations),
      default=lambda *a: _dwconvs(*a, dilations))


def _dwconv_merged(y_BHWD, kernel_N33D, bias_ND, dilations):
  """The N kernels placed in one (2P + 1)^2 kernel (P the largest dilation; the centres add
  up) and one depthwise convolution with it, differentiated by XLA. Its taps outside the N 3 x
  3 grids are zero: 49 taps for (1, 2, 3) where the stencil has 25. Compiled for v5e, a VSS
  block with both adaptors (bf16, batch 32, fwd + bwd) moved 1.6% / 1.9% / 2.1% fewer bytes
  than with the stencil at widths 96 / 192 / 384 (the stencil keeps a float32 copy of y for its
  25 reads) and held 9% / 0% / 14% fewer temporaries; the whole train step (adaptor_cost.py)
  2.249 -> 2.230 GB per image for the booster, 2.737 -> 2.699 for b2, for +0.5% / +0.8% FLOPs.
  GPUs keep the stencil: not measured there."""
  P, D = max(dilations), y_BHWD.shape[-1]
  acc = jnp.promote_types(y_BHWD.dtype, jnp.float32)
  k = jnp.zeros((2 * P + 1, 2 * P + 1, D), acc)
  for n, d in enumerate(dilations):
    grid = slice(P - d, P + d + 1, d)
    k = k.at[grid, grid].add(kernel_N33D[n].astype(acc))
  out = _depthwise_conv(y_BHWD, k.astype(y_BHWD.dtype), preferred_element_type=acc)
  return (out + bias_ND.astype(acc).sum(0)).astype(y_BHWD.dtype)


def _depthwise_conv(x_BHWD, kernel_HWD, **kwargs):
  """XLA's depthwise convolution with an odd square kernel, zero "same" padding."""
  P = kernel_HWD.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x_BHWD, kernel_HWD[:, :, None, :], (1, 1), ((P, P), (P, P)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x_BHWD.shape[-1],
      **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dwconvs(y_BHWD, kernel_N33D, bias_ND, dilations):
  acc = jnp.promote_types(y_BHWD.dtype, jnp.float32)
  out = _stencil(y_BHWD.astype(acc), kernel_N33D.astype(acc), dilations, 1)
  return (out + bias_ND.astype(acc).sum(0)).astype(y_BHWD.dtype)


def _dwconvs_fwd(y_BHWD, kernel_N33D, bias_ND, dilations):
  return _dwconvs(y_BHWD, kernel_N33D, bias_ND, dilations), (y_BHWD, kernel_N33D, bias_ND)


def _dwconvs_bwd(dilations, res, g_BHWD):
  """dy is the mirrored stencil of g; d kernel[tap] = sum of y times g shifted against the tap.
  Only g is shifted here: shifts of y would be the forward's, which XLA:CPU merges with these
  (its CSE runs after optimization barriers are gone) and so keeps from forward to backward."""
  y_BHWD, kernel_N33D, bias_ND = res
  _, H, W, _ = y_BHWD.shape
  acc = jnp.promote_types(y_BHWD.dtype, jnp.float32)
  g, y, k = g_BHWD.astype(acc), y_BHWD.astype(acc), kernel_N33D.astype(acc)
  P = max(dilations)
  g_pad = jnp.pad(g, [(0, 0), (P, P), (P, P), (0, 0)])
  dy = g * k[:, 1, 1].sum(0)
  dk = jnp.zeros(k.shape, acc).at[:, 1, 1].set(jnp.sum(y * g, axis=(0, 1, 2)))
  for n, a, b, oy, ox in _stencil_taps(dilations):
    g_shift = g_pad[:, P - oy:P - oy + H, P - ox:P - ox + W]
    dy = dy + g_shift * k[n, a, b]
    dk = dk.at[n, a, b].set(jnp.sum(y * g_shift, axis=(0, 1, 2)))
  db = jnp.broadcast_to(g.sum(axis=(0, 1, 2)), bias_ND.shape)
  return dy.astype(y_BHWD.dtype), dk.astype(kernel_N33D.dtype), db.astype(bias_ND.dtype)


_dwconvs.defvjp(_dwconvs_fwd, _dwconvs_bwd)


@jax.jit
def depthwise_conv3x3(x_BHWD, kernel_33D):
  """Depthwise 3x3 convolution, zero "same" padding, no bias (SS2D's conv2d), in x's dtype. On
  the CPU it is the dilated_dwconvs stencil: XLA:CPU takes a depthwise convolution's kernel
  gradient as a dense (D, 3, 3, D) one (85 MB per image in each block of b2's last stage;
  vmamba_tiny's train step 0.9 s against 0.6 s). Elsewhere it is XLA's convolution: compiled
  for v5e, the stencil made vmamba_tiny's train step move 3.5% more bytes."""
  kernel_33D = kernel_33D.astype(x_BHWD.dtype)

  def stencil(x, k):
    return _dwconvs(x, k[None], jnp.zeros((1, k.shape[-1]), x.dtype), (1,))

  return jax.lax.platform_dependent(x_BHWD, kernel_33D, cpu=stencil, default=_depthwise_conv)


selective_scan = jax.jit(
    kernels.selective_scan,
    static_argnames=("delta_softplus", "return_last_state", "reverse", "backend"))
memory_read = jax.jit(kernels.memory_read, static_argnames=("backend",))
learned_read = jax.jit(kernels.learned_read, static_argnames=("backend",))


# Rematerialisation of a block's activations in the backward pass (config.remat): "none" keeps
# what autodiff keeps; "full" keeps only the block's input and recomputes the block;
# "matmuls" keeps the outputs of the block's matrix products and recomputes the rest
# (norms, activations, convolutions, the scans).
REMAT = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
         "matmuls": jax.checkpoint_policies.checkpoint_dots}


def check_remat(remat, where):
  if remat not in REMAT:
    raise ValueError(f"{where}: remat must be one of {sorted(REMAT)}, got {remat!r}")


def run_block(block, remat, *args):
  """block(*args), its activations rematerialised by the REMAT policy named `remat`."""
  if REMAT[remat] is None:
    return block(*args)
  return nnx.remat(lambda b, *a: b(*a), policy=REMAT[remat])(block, *args)


class BatchNorm(nnx.Module):
  """BatchNorm2d over the channels of (B, H, W, C), as PyTorch's: eps 1e-5, momentum 0.1, the
  running variance updated with the unbiased batch variance. In training (nnx's train())
  it normalises by the batch's statistics, of the whole global batch on a mesh (a mean over
  a sharded batch is an all-reduce: SyncBN), and updates the running statistics (nnx.BatchStat:
  the train state's `stats`, not params); in eval (eval()) it uses the running ones."""

  def __init__(self, dim, *, axis_name=None):
    self.scale = annotated(jnp.ones((dim,)), axis_name)
    self.bias = annotated(jnp.zeros((dim,)), axis_name)
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32))
    self.use_running_average = False

  def __call__(self, x_BHWC):
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      x32 = x_BHWC.astype(jnp.float32)
      mean = x32.mean((0, 1, 2))
      var = jnp.square(x32 - mean).mean((0, 1, 2))
      n = math.prod(x_BHWC.shape[:3])
      unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
      self.mean[...] = 0.9 * self.mean[...] + 0.1 * jax.lax.stop_gradient(mean)
      self.var[...] = 0.9 * self.var[...] + 0.1 * unbiased
    return batch_norm(x_BHWC, mean, var, self.scale[...], self.bias[...])


class LayerNorm(nnx.Module):
  """LayerNorm over channels (eps 1e-5, as PyTorch), params float32."""

  def __init__(self, dim, *, axis_name="embed"):
    self.scale = annotated(jnp.ones((dim,)), axis_name)
    self.bias = annotated(jnp.zeros((dim,)), axis_name)

  def __call__(self, x):
    return layer_norm(x, self.scale[...], self.bias[...])


def linear(din, dout, names, *, rngs, dtype, use_bias=True, init=trunc_normal):
  """nnx.Linear with a truncated-normal(0.02) kernel, zero bias and logical axis names."""
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, kernel_init=logical(init, *names),
                    bias_init=logical(zeros, names[-1]), rngs=rngs)


def conv(din, dout, kernel, *, rngs, dtype, stride=1, groups=1, dilation=1, use_bias=True,
         init=None, names=(None, None, None, "embed")):
  """nnx.Conv, NHWC, PyTorch padding (kernel // 2 * dilation); weights and bias drawn from `init`,
  PyTorch's default U(+-1/sqrt(fan_in)) when it is None."""
  fan_in = din // groups * kernel * kernel
  init = fan_in_uniform(fan_in) if init is None else init
  pad = kernel // 2 * dilation
  return nnx.Conv(din, dout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                  kernel_dilation=dilation, feature_group_count=groups, use_bias=use_bias,
                  dtype=dtype, kernel_init=logical(init, *names),
                  bias_init=logical(init, names[-1]), rngs=rngs)


def drop_path(rate, rngs, ndim=4):
  """Stochastic depth: drops a whole sample's residual branch (nnx.Dropout broadcast over all
  but the batch axis of an `ndim`-dimensional input)."""
  return nnx.Dropout(rate, broadcast_dims=tuple(range(1, ndim)), rngs=rngs)


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
  """softplus^-1 of dt ~ exp(U(log dt_min, log dt_max)) clamped at `floor` (Mamba's init)."""
  log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
  dt = jnp.maximum(jnp.exp(log_dt), floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def a_log_init(shape):
  """Mamba's S4D-real A_log: log(1..N) along the last axis (N = shape[-1]) of every channel."""
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=jnp.float32)), shape)
