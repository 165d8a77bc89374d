"""Adaptor-T (learned memory selection over the scan's hidden states) and Adaptor-S (multi-scale
dilated depthwise convolutions), DESIGN.md §3.

Both act inside SS2D. Adaptor-T takes the hidden states of the four scan routes side by side,
h_BLE with E = 4 x D (route r = direction * 2 + sequence: 0 row-major, 1 column-major, 2 and 3
the same sequences scanned in reverse), all indexed in the original (unflipped) sequence order. For every position i, route r
and channel group s it reads K earlier states of that route's scan ("earlier" means larger i for the
reverse routes) at fractional locations, by linear interpolation, and adds their weighted sum:
  h'_i = h_i + gamma_r * sum_k c_k h_{p_k},   p_k = clip(i -/+ w_s sigmoid(o_k), 0, L-1),
  w_s = L / 2^(S-1-s),   o = phi_p(h_i),   c = softmax(phi_c(h_i)).
phi_p, phi_c, the locations and the read are the op kernels.learned_read (its heads are the
(route, group) pairs; kernels.memory_read with fixed locations for selection="static"), which
also forms h' and multiplies it by the scan's C: it never writes the 2K interpolation taps to
memory, keeps neither the read nor h' for the backward (it recomputes the read there), and on
TPU takes phi's product and its backward inside the read's kernels.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptor_jax.models import common

ROUTES = 4


@dataclasses.dataclass(frozen=True)
class AdaptorConfig:
  """The adaptor's hyper-parameters; the same ones go into every preset that has an adaptor."""
  num_groups: int = 4         # S: channel groups ("sequences"), group s looks back L / 2^(S-1-s)
  num_points: int = 4         # K: locations read per position and group
  selection: str = "learned"  # "learned" (phi_p, phi_c) or "static" (even spacing, uniform c)
  dilations: tuple = (1, 2, 3)  # Adaptor-S depthwise 3x3 convolutions

  def __post_init__(self):
    if self.selection not in ("learned", "static"):
      raise ValueError("AdaptorConfig.selection must be 'learned' or 'static', "
                       f"got {self.selection!r}")
    if self.num_groups < 1 or self.num_points < 1:
      raise ValueError("AdaptorConfig.num_groups and num_points must be >= 1, got "
                       f"{self.num_groups} and {self.num_points}")
    if not self.dilations or min(self.dilations) < 1:
      raise ValueError(f"AdaptorConfig.dilations must be positive, got {self.dilations!r}")


# The parallel branch of the transfer form reads twice the locations (K = 8): with VMamba-T/S/B
# and a 100-class head it trains 1.59M / 4.65M / 6.20M params, within 10% of the paper's Table 4
# (1.68M / 5.10M / 6.8M), where K = 4 trains about half (0.92M / 2.63M / 3.51M).
PARALLEL = AdaptorConfig(num_points=8)


class AdaptorT(nnx.Module):
  """Memory selection on the hidden states h_BLRD of the four routes (Di channels each)."""

  def __init__(self, d_inner, cfg: AdaptorConfig, *, gamma_init, dtype, rngs):
    S, K = cfg.num_groups, cfg.num_points
    if d_inner % S:
      raise ValueError(f"AdaptorT: inner width {d_inner} is not divisible by num_groups={S}")
    self.num_groups, self.num_points, self.dtype = S, K, dtype
    self.selection = cfg.selection
    if cfg.selection == "learned":
      # phi_p's bias starts the K locations evenly spread over each group's window.
      spread = np.log((np.arange(K) + 0.5) / K) - np.log1p(-(np.arange(K) + 0.5) / K)
      self.phi_p = common.param(rngs, common.trunc_normal, (ROUTES, d_inner, S * K),
                                "route", "inner", None)
      self.phi_p_bias = common.annotated(np.tile(spread, (ROUTES, S)), "route", None)
      self.phi_c = common.param(rngs, common.trunc_normal, (ROUTES, d_inner, S * K),
                                "route", "inner", None)
      self.phi_c_bias = common.param(rngs, common.zeros, (ROUTES, S * K), "route", None)
    self.gamma = common.annotated(jnp.full((ROUTES, d_inner), gamma_init), "route", "inner")

  def __call__(self, h_BLE, scale_BRL=None):
    """h' = h + gamma * read of every route, times scale_BRL (the scan's C, per route and
    position) when it is given. h_BLE: the four routes' states side by side, E = 4 x D."""
    B, L, E = h_BLE.shape
    R, S, K = ROUTES, self.num_groups, self.num_points
    D = E // R
    G = R * S  # the read's heads: (route, group) pairs
    # Everything per position is laid out points first, positions last: (B, K, G, L), padded
    # neither in its lanes nor in its sublanes on TPU (G = 16 heads).
    window_S = L / 2.0 ** (S - 1 - jnp.arange(S, dtype=jnp.float32))
    back_R = jnp.array([-1.0, -1.0, 1.0, 1.0])  # forward routes look left, reverse ones right
    reach_G = (back_R[:, None] * window_S).reshape(G)
    h_BLGC = h_BLE.reshape(B, L, G, D // S)
    gamma_GC = self.gamma[...].reshape(G, D // S)
    scale = None if scale_BRL is None else jnp.repeat(scale_BRL, S, axis=1)
    if self.selection == "learned":  # phi_p and phi_c as one product per route, its outputs
      # ordered (p or c, point, group)
      kmajor = lambda x: jnp.swapaxes(x.reshape(*x.shape[:-1], S, K), -1, -2).reshape(x.shape)
      w_RDC = jnp.concatenate([kmajor(self.phi_p[...]), kmajor(self.phi_c[...])], axis=-1)
      b_RC = jnp.concatenate([kmajor(self.phi_p_bias[...]), kmajor(self.phi_c_bias[...])], -1)
      out = common.learned_read(h_BLGC, w_RDC, b_RC, reach_G, gamma_GC, scale)
    else:
      move_BKGL = jnp.broadcast_to(((jnp.arange(K) + 1.0) / K)[:, None, None], (B, K, G, L))
      p_BKGL = jnp.clip(jnp.arange(L, dtype=jnp.float32) + reach_G[:, None] * move_BKGL,
                        0.0, L - 1)
      out = common.memory_read(h_BLGC, p_BKGL, jnp.full((B, K, G, L), 1.0 / K), gamma_GC, scale)
    return out.reshape(B, L, E)


class AdaptorS(nnx.Module):
  """y + sum_d DWConv3x3_dilation=d(y) on the merged SS2D output y_BHWD.

  The params are those of three depthwise nnx.Conv (convs[i].kernel (3, 3, 1, D), .bias (D,)),
  but the sum is computed as one stencil (common.dilated_dwconvs): XLA:CPU lowers a depthwise
  convolution's weight gradient as a dense D x D one, and three convolutions pass over y three
  times where one fused pass reads it once."""

  def __init__(self, d_inner, cfg: AdaptorConfig, *, zero_init, dtype, rngs):
    init = common.zeros if zero_init else None
    self.dilations = tuple(cfg.dilations)
    self.convs = nnx.List([
        common.conv(d_inner, d_inner, 3, groups=d_inner, dilation=d, init=init, dtype=dtype,
                    names=(None, None, None, "inner"), rngs=rngs)
        for d in cfg.dilations])

  def __call__(self, y_BHWD):
    kernel_N33D = jnp.stack([c.kernel[...][:, :, 0] for c in self.convs])
    bias_ND = jnp.stack([c.bias[...] for c in self.convs])
    return y_BHWD + common.dilated_dwconvs(y_BHWD, kernel_N33D, bias_ND, self.dilations)
