"""Parameter and FLOP counts, FLOPs as fvcore counts them (multiply-adds).

The model is traced to a jaxpr (no compute) and its equations are counted:
  dot_general            output size x contracted size
  conv_general_dilated   output size x (input channels / groups) x kernel area
  layer_norm             5 per element (fvcore's count for an affine LayerNorm)
  global_avg_pool        1 per input element
  batch_norm             2 per element (an affine BatchNorm in eval mode)
  resize_bilinear        4 per output element (fvcore's upsample_bilinear2d)
  adaptive_avg_pool      1 per input element
  selective_scan         9 B L D N + B L D (VMamba's count: its D term included)
  memory_read            2K per element of the read (its weighted sum of 2K interpolation taps,
                         the multiply-adds of the einsum it replaces)
  learned_read           memory_read's, plus phi's product: 2 K S per element of h (each route's
                         linear map of its states to 2 K S logits per position)
  dilated_dwconvs        9 N per element of y (Adaptor-S's N depthwise 3x3 convolutions, counted
                         as the convolutions they are)
  depthwise_conv3x3      9 per element of x (SS2D's conv2d, a convolution or a stencil by platform)
Everything else (activations, additions, element-wise products, gathers) counts 0, as in fvcore.
The named ones are found by the names under which adaptor_jax.models.common jits them. The
model is counted in eval mode (BatchNorm with its running statistics, as fvcore counts it).
"""
import math
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels


def count_params(model, wrt=nnx.Param):
  """Number of parameters matching the nnx filter `wrt` (shared ones once); e.g.
  wrt=vmamba.trainable(model) counts those that train."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, wrt)))


def _dot_general(eqn):
  (contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)


def _conv(eqn):
  dn = eqn.params["dimension_numbers"]
  rhs = eqn.invars[1].aval.shape
  in_per_group = rhs[dn.rhs_spec[1]]
  kernel_area = math.prod(rhs[d] for d in dn.rhs_spec[2:])
  return math.prod(eqn.outvars[0].aval.shape) * in_per_group * kernel_area


def _scan(eqn):
  u, _, A = (v.aval.shape for v in eqn.invars[:3])
  batch, length, d = u
  return 9 * batch * length * d * A[1] + batch * length * d


def _route_heads(eqn):  # learned_read's S: its G heads over w's R routes
  return eqn.invars[0].aval.shape[2] // eqn.invars[1].aval.shape[0]


PRIMITIVES = {"dot_general": _dot_general, "conv_general_dilated": _conv}
NAMED = {
    "layer_norm": lambda eqn: 5 * math.prod(eqn.invars[0].aval.shape),
    "global_avg_pool": lambda eqn: math.prod(eqn.invars[0].aval.shape),
    "batch_norm": lambda eqn: 2 * math.prod(eqn.invars[0].aval.shape),
    "resize_bilinear": lambda eqn: 4 * math.prod(eqn.outvars[0].aval.shape),
    "adaptive_avg_pool": lambda eqn: math.prod(eqn.invars[0].aval.shape),
    "selective_scan": _scan,
    "memory_read": lambda eqn: 2 * eqn.invars[1].aval.shape[1] * math.prod(
        eqn.invars[0].aval.shape),
    "learned_read": lambda eqn: (2 * eqn.invars[1].aval.shape[2] // (2 * _route_heads(eqn))
                                 + eqn.invars[1].aval.shape[2]) * math.prod(
        eqn.invars[0].aval.shape),
    "dilated_dwconvs": lambda eqn: 9 * eqn.invars[1].aval.shape[0] * math.prod(
        eqn.invars[0].aval.shape),
    "depthwise_conv3x3": lambda eqn: 9 * math.prod(eqn.invars[0].aval.shape),
}


def count_jaxpr(jaxpr, by_kind=None):
  """Multiply-adds in `jaxpr`; `by_kind` (a dict) collects them per counted operation."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.params.get("name") if eqn.primitive.name in ("pjit", "jit") else None
    rule = NAMED.get(name) or PRIMITIVES.get(eqn.primitive.name)
    if rule is not None:
      n = rule(eqn)
      kind = name or eqn.primitive.name
      if by_kind is not None:
        by_kind[kind] = by_kind.get(kind, 0) + n
      total += n
    else:
      total += sum(count_jaxpr(sub, by_kind) 
                 for sub in jax.extend.core.jaxprs_in_params(eqn.params))
  return total


def count_flops(model, image_size=224, batch=1, by_kind=None):
  """Multiply-adds of one forward pass of `model` in eval mode on (batch, height, width, 3)
  images; image_size: an int (square) or (height, width)."""
  graphdef, state = nnx.split(model)

  def forward(state, x):
    model = nnx.merge(graphdef, state)
    model.eval()
    return model(x)

  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  x = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
  # The named ops are counted where they are called, whatever runs inside; tracing "auto"
  # traces every platform's branch, and the TPU read kernel refuses images whose rows exceed
  # its VMEM (segmentation sizes) at trace time: count with the xla read.
  previous = os.environ.get(kernels.read.ENV_VAR)
  os.environ[kernels.read.ENV_VAR] = "xla"
  try:
    closed = jax.make_jaxpr(forward)(state, x)
  finally:
    if previous is None:
      del os.environ[kernels.read.ENV_VAR]
    else:
      os.environ[kernels.read.ENV_VAR] = previous
  return count_jaxpr(closed.jaxpr, by_kind)
