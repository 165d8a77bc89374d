"""SS2D: VMamba v2's 2-D selective scan ("v05_noz"), optionally carrying Adaptor-T and Adaptor-S.

x_BHWC -> in_proj -> depthwise 3x3 -> SiLU = u. The four routes over L = H*W are row-major and
column-major sequences, each scanned forward and in reverse (the op's `reverse=True`, so no flipped
copy exists). Route r = direction * 2 + sequence; per route: x_proj (Di -> R + 2N) gives dt, B, C;
dt_proj (R -> Di) gives delta. The routes are merged by summing them back in (H, W) order, then
out_norm -> out_proj.

With an adaptor the scan runs with C = 1 and D = 0, which for N = 1 returns the hidden states h;
Adaptor-T returns C * h' (its read op applies C); the routes' D * u, merged, is (sum_r D_r) * u,
added once after the merge.
Adaptor-S acts on the merged y before out_norm. That tail (Adaptor-T, merge, D * u, Adaptor-S) is
rematerialised in the backward from what is kept anyway (h, C positions last, the rows sequence
of u), plus the merged y (Adaptor-S's input, a quarter of h: the read is not computed again) and
phi's product where XLA takes it (kernels.learned.PHI: h is not laid out for it again). Without
it XLA:TPU keeps route-sized tensors of every block from the forward to the backward; what each
choice saves is measured in benchmarks/README.md ("Design measurements"). XLA:CPU merges the
recomputation back into the forward, so there it changes nothing.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from adaptor_jax.models import common
from adaptor_jax.models.adaptor import ROUTES
from kernels.learned import PHI

MERGED = "ss2d_merged"


class SS2D(nnx.Module):

  def __init__(self, d_model, *, ssm_ratio, d_state=1, adaptor_t=None, adaptor_s=None,
               dtype=jnp.float32, scan_backend="auto", rngs):
    d_inner = int(ssm_ratio * d_model)
    rank = math.ceil(d_model / 16)
    if adaptor_t is not None and d_state != 1:
      raise ValueError(f"SS2D: Adaptor-T reads the scan's hidden states, which needs d_state=1; "
                       f"got d_state={d_state}")
    self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
    self.dtype, self.scan_backend = dtype, scan_backend
    self.in_proj = common.linear(d_model, d_inner, ("embed", "inner"), use_bias=False,
                                 dtype=dtype, rngs=rngs)
    self.conv2d = common.conv(d_inner, d_inner, 3, groups=d_inner, use_bias=False, dtype=dtype,
                              names=(None, None, None, "inner"), rngs=rngs)
    self.x_proj = common.param(rngs, common.fan_in_uniform(d_inner),
                               (ROUTES, d_inner, rank + 2 * d_state), "route", "inner", None)
    self.dt_proj = common.param(rngs, common.uniform(rank ** -0.5), (ROUTES, rank, d_inner),
                                "route", None, "inner")
    self.dt_bias = common.param(rngs, common.dt_bias_init, (ROUTES, d_inner), "route", "inner")
    self.A_log = common.annotated(common.a_log_init((ROUTES, d_inner, d_state)),
                                  "route", "inner", None)
    self.D = common.annotated(jnp.ones((ROUTES, d_inner)), "route", "inner")
    self.out_norm = common.LayerNorm(d_inner, axis_name="inner")
    self.out_proj = common.linear(d_inner, d_model, ("inner", "embed"), use_bias=False,
                                  dtype=dtype, rngs=rngs)
    self.adaptor_t, self.adaptor_s = adaptor_t, adaptor_s

  def __call__(self, x_BHWC):
    # conv2d keeps nnx.Conv's params; common.depthwise_conv3x3 computes it
    x_BHWD = self.in_proj(x_BHWC)
    u_BHWD = jax.nn.silu(common.depthwise_conv3x3(x_BHWD, self.conv2d.kernel[...][:, :, 0]))
    Bsz, H, W, Di = u_BHWD.shape
    L, N, R = H * W, self.d_state, self.dt_rank
    # the two sequences side by side in the last axis (sequence j = 0 rows, 1 columns), and every
    # product below per sequence: a (B, L, 2, Di) view is another tiled layout on TPU, a copy
    seqs = (u_BHWD.reshape(Bsz, L, Di), u_BHWD.transpose(0, 2, 1, 3).reshape(Bsz, L, Di))
    cdt, C2 = self.dtype, R + 2 * N
    x_proj = self.x_proj[...].astype(cdt).reshape(2, 2, Di, C2)  # (direction, sequence, ...)
    dt_proj = self.dt_proj[...].astype(cdt).reshape(2, 2, R, Di)
    # dbl[j]: (B, L, 2 x (R + 2N)), both directions' dt, B, C of sequence j
    dbl = [seqs[j] @ jnp.concatenate([x_proj[0, j], x_proj[1, j]], axis=-1) for j in (0, 1)]
    part = lambda i, j, a, b: dbl[j][:, :, i * C2 + a:i * C2 + b]
    delta_IBLE = [jnp.concatenate([part(i, j, 0, R) @ dt_proj[i, j] for j in (0, 1)], axis=-1)
                  for i in (0, 1)]
    B_IBLJN = [jnp.stack([part(i, j, R, R + N) for j in (0, 1)], axis=2) for i in (0, 1)]
    C_IBLJN = [jnp.stack([part(i, j, R + N, C2) for j in (0, 1)], axis=2) for i in (0, 1)]
    A_IEN = -jnp.exp(self.A_log[...]).reshape(2, 2 * Di, N)
    D_IE = self.D[...].reshape(2, 2 * Di)
    bias_IE = self.dt_bias[...].reshape(2, 2 * Di)
    u_BLE = jnp.concatenate(seqs, axis=-1)
    adapt = self.adaptor_t is not None
    ones_BLJN = jnp.ones((Bsz, L, 2, N), u_BLE.dtype)
    outs = [common.selective_scan(
        u_BLE, delta_IBLE[i], A_IEN[i], B_IBLJN[i],
        ones_BLJN if adapt else C_IBLJN[i], None if adapt else D_IE[i], None, bias_IE[i],
        delta_softplus=True, reverse=bool(i), backend=self.scan_backend) for i in (0, 1)]
    y_BLE = jnp.concatenate(outs, axis=-1)  # the routes side by side: E = 4 x Di
    if adapt:  # the scan returned h: Adaptor-T, the merge, D * u and Adaptor-S, recomputed
      # from h in the backward (see the module docstring)
      tail = jax.checkpoint(lambda h, c, u: self._adapted(h, c, u, H, W),  # mutates nothing
                            policy=jax.checkpoint_policies.save_only_these_names(MERGED, PHI))
      # its inputs, kept: C positions last, and u as the rows sequence of the scan's input
      C_BRL = jnp.moveaxis(jnp.concatenate(C_IBLJN, axis=2)[..., 0], 1, -1)  # N = 1
      y_BHWD = tail(y_BLE, C_BRL, seqs[0])
    else:
      y_BHWD = merge_routes(y_BLE, H, W)
      if self.adaptor_s is not None:
        y_BHWD = self.adaptor_s(y_BHWD)
    return self.out_proj(self.out_norm(y_BHWD))

  def _adapted(self, h_BLE, C_BRL, u_BLD, H, W):
    """y = sum over routes of C * h' (Adaptor-T applies C), + (sum of the routes' D) * u once
    after the merge; then Adaptor-S."""
    Bsz, L, Di = u_BLD.shape
    y_BLE = self.adaptor_t(h_BLE, C_BRL)
    y_BHWD = merge_routes(y_BLE, H, W)
    y_BHWD = y_BHWD + self.D[...].sum(0).astype(self.dtype) * u_BLD.reshape(Bsz, H, W, Di)
    y_BHWD = checkpoint_name(y_BHWD, MERGED)
    return y_BHWD if self.adaptor_s is None else self.adaptor_s(y_BHWD)


def merge_routes(y_BLE, H, W):
  """The four routes (side by side in the last axis, Di each) summed back in (H, W) order:
  (B, H, W, Di). Slices of the last axis: a (B, L, 4, Di) view is another tiled layout on TPU,
  two copies of the routes (a VSS block of width 192 at 28 x 28, v5e, batch 32, fwd + bwd:
  0.21 GB per image with them, 0.19 without; 0.35 and 0.33 with both adaptors)."""
  Bsz, _, E = y_BLE.shape
  Di = E // ROUTES
  route = lambda r: y_BLE[:, :, r * Di:(r + 1) * Di]
  y_rows = (route(0) + route(2)).reshape(Bsz, H, W, Di)
  y_cols = (route(1) + route(3)).reshape(Bsz, W, H, Di).transpose(0, 2, 1, 3)
  return y_rows + y_cols
