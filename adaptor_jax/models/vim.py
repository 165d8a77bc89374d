"""Vim (Zhu et al. 2024, "Vision Mamba"): a plain ViT-like stack of bidirectional Mamba blocks.

Follows the official (hustvl/Vim) models "vim_{tiny,small}_patch16[_stride8]_224_bimambav2_
final_pool_mean_abs_pos_embed_with_midclstok_div2". Images (B, H, W, 3) -> Conv(kernel 16,
stride 16 or 8) patches, M tokens -> a learned cls token inserted at position M // 2 -> + a learned
absolute position embedding (M0 + 1 rows, M0 the token count at `image_size`; bilinearly resized
for other sizes) -> `depth` blocks -> residual add + RMSNorm -> the cls token's output -> Linear
head. The official model returns the cls token whenever it has one: its final_pool_type='mean' is
never reached, so there is no pooling.

Blocks use mamba_ssm's fused add + norm with the residual stream in float32:
  residual = residual + DropPath(hidden);  hidden = mixer(RMSNorm(residual))
(the first block takes residual = tokens). Block i drops the hidden it receives with rate
linspace(0, drop_path_rate, depth)[i - 1]; the final add uses drop_path_rate itself, as the official
code does.

The mixer is "bimamba v2" with if_divide_out: in_proj (D -> 2 Di) gives x, z; each direction has
its own depthwise conv1d (k = 4, bias) + SiLU, x_proj, dt_proj, A_log, D; the backward direction
reads the sequence from the end: an anti-causal conv (the kernel flipped, padding on the right) and
the scan's `reverse=True`, so no flipped copy of the sequence exists; the gate silu(z) is the scan's
z. out = out_proj((y_fwd + y_bwd) / 2).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptor_jax.models import common


# Params that never decay, besides every 1-D param and every bias (Vim's no_weight_decay list).
NO_WEIGHT_DECAY = ("A_log", "A_b_log", "D", "D_b", "cls_token", "pos_embed")


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * weight over the last axis, in float32 (mamba_ssm's RMSNorm)."""

  def __init__(self, dim, *, eps=1e-5):
    self.eps = eps
    self.weight = common.annotated(jnp.ones((dim,)), "embed")

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    rms = jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return x32 * rms * self.weight[...]


class DepthwiseConv1d(nnx.Module):
  """PyTorch's causal depthwise conv1d (padding K - 1, first L outputs kept) on (B, L, D):
  out[t] = bias + sum_k w[k] x[t - (K-1) + k]. anti_causal=True gives what that conv computes on
  the reversed sequence, at the original positions: out[t] = bias + sum_k w[k] x[t + (K-1) - k]."""

  def __init__(self, dim, kernel, *, anti_causal=False, rngs):
    self.anti_causal = anti_causal
    self.weight = common.param(rngs, common.fan_in_uniform(kernel), (kernel, dim), None, "inner")
    self.bias = common.param(rngs, common.fan_in_uniform(kernel), (dim,), "inner")

  def __call__(self, x_BLD):
    w_KD = self.weight[...].astype(x_BLD.dtype)
    K, D = w_KD.shape
    if self.anti_causal:
      w_KD = w_KD[::-1]
    pad = (0, K - 1) if self.anti_causal else (K - 1, 0)
    out = jax.lax.conv_general_dilated(
        x_BLD, w_KD[:, None, :], window_strides=(1,), padding=(pad,),
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=D)
    return out + self.bias[...].astype(x_BLD.dtype)


def torch_linear_init(fan_in, scale=1.0):
  """PyTorch's default Linear weight init, U(+-1/sqrt(fan_in)), times `scale`."""
  base = common.fan_in_uniform(fan_in)
  return lambda key, shape, dtype=jnp.float32: scale * base(key, shape, dtype)


class BiMamba(nnx.Module):
  """Bidirectional Mamba ("bimamba v2", if_divide_out=True) on (B, L, D) sequences.

  Per direction (the backward one's names end in _b): conv1d, x_proj (Di -> R + 2N), dt_proj
  (R -> Di, its bias the scan's delta_bias), A_log (A = -exp(A_log)), D; names follow mamba_ssm.
  """

  def __init__(self, d_model, *, d_state=16, expand=2, d_conv=4, depth=24, dtype=jnp.float32,
               scan_backend="auto", rngs):
    d_inner = int(expand * d_model)
    rank = math.ceil(d_model / 16)
    self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
    self.dtype, self.scan_backend = dtype, scan_backend
    self.in_proj = common.linear(d_model, 2 * d_inner, ("embed", "inner"), use_bias=False,
                                 init=torch_linear_init(d_model), dtype=dtype, rngs=rngs)

    def direction(anti_causal):
      conv1d = DepthwiseConv1d(d_inner, d_conv, anti_causal=anti_causal, rngs=rngs)
      x_proj = common.linear(d_inner, rank + 2 * d_state, ("inner", None), use_bias=False,
                             init=torch_linear_init(d_inner), dtype=dtype, rngs=rngs)
      dt_proj = nnx.Linear(rank, d_inner, dtype=dtype, rngs=rngs,
                           kernel_init=common.logical(common.uniform(rank ** -0.5), None, "inner"),
                           bias_init=common.logical(common.dt_bias_init, "inner"))
      A_log = common.annotated(common.a_log_init((d_inner, d_state)), "inner", None)
      D = common.annotated(jnp.ones((d_inner,)), "inner")
      return conv1d, x_proj, dt_proj, A_log, D

    self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = direction(False)
    self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b = direction(True)
    # mamba_ssm's rescaled prenorm-residual init: PyTorch's default divided by sqrt(n_layer)
    self.out_proj = common.linear(d_inner, d_model, ("inner", "embed"), use_bias=False,
                                  init=torch_linear_init(d_inner, 1 / math.sqrt(depth)),
                                  dtype=dtype, rngs=rngs)

  def _scan(self, x_BLD, z_BLD, conv1d, x_proj, dt_proj, A_log, D, *, reverse):
    N, R = self.d_state, self.dt_rank
    u_BLD = jax.nn.silu(conv1d(x_BLD))
    dt_BLR, B_BLN, C_BLN = jnp.split(x_proj(u_BLD), [R, R + N], axis=-1)
    delta_BLD = dt_BLR @ dt_proj.kernel[...].astype(dt_BLR.dtype)
    return common.selective_scan(
        u_BLD, delta_BLD, -jnp.exp(A_log[...]), B_BLN[:, :, None], C_BLN[:, :, None], D[...],
        z_BLD, dt_proj.bias[...], delta_softplus=True, reverse=reverse, backend=self.scan_backend)

  def __call__(self, h_BLD):
    x_BLD, z_BLD = jnp.split(self.in_proj(h_BLD.astype(self.dtype)), 2, axis=-1)
    y_fwd = self._scan(x_BLD, z_BLD, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D,
                       reverse=False)
    y_bwd = self._scan(x_BLD, z_BLD, self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log,
                       self.D_b, reverse=True)
    return self.out_proj((y_fwd + y_bwd) / 2)


class Block(nnx.Module):
  """(hidden, residual) -> (mixer(RMSNorm(residual')), residual'), residual' = residual +
  DropPath(hidden) in float32; the first block gets residual=None and uses hidden as residual'."""

  def __init__(self, dim, *, drop_path, d_state, expand, d_conv, depth, dtype, scan_backend,
               rngs):
    self.mixer = BiMamba(dim, d_state=d_state, expand=expand, d_conv=d_conv, depth=depth,
                         dtype=dtype, scan_backend=scan_backend, rngs=rngs)
    self.norm = RMSNorm(dim)
    self.drop_path = common.drop_path(drop_path, rngs, ndim=3)

  def __call__(self, hidden_BLD, residual_BLD):
    hidden_BLD = hidden_BLD.astype(jnp.float32)
    residual_BLD = (hidden_BLD if residual_BLD is None
                    else residual_BLD + self.drop_path(hidden_BLD))
    return self.mixer(self.norm(residual_BLD).astype(self.mixer.dtype)), residual_BLD


class Vim(nnx.Module):
  """Vision Mamba. Takes images (B, H, W, 3); returns logits (B, num_classes), or with
  return_features=True the final normed token sequence (B, M + 1, D), cls token at M // 2.
  remat: how each block's activations are kept for the backward pass (common.REMAT)."""

  def __init__(self, *, embed_dim, depth=24, patch_size=16, stride=16, d_state=16, expand=2,
               d_conv=4, num_classes=1000, image_size=224, drop_path_rate=0.0,
               dtype=jnp.float32, scan_backend="auto", remat="none", rngs: nnx.Rngs):
    common.check_remat(remat, "Vim")
    if image_size < patch_size:
      raise ValueError(f"Vim: image_size {image_size} is smaller than one patch ({patch_size})")
    self.embed_dim, self.depth = embed_dim, depth
    self.patch_size, self.stride, self.dtype, self.remat = patch_size, stride, dtype, remat
    side = (image_size - patch_size) // stride + 1
    self.grid_size = (side, side)
    self.patch_embed = nnx.Conv(
        3, embed_dim, (patch_size, patch_size), strides=stride, padding="VALID", dtype=dtype,
        kernel_init=common.logical(nnx.initializers.lecun_normal(), None, None, None, "embed"),
        bias_init=common.logical(common.zeros, "embed"), rngs=rngs)
    self.cls_token = common.param(rngs, common.trunc_normal, (embed_dim,), "embed")
    self.pos_embed = common.param(rngs, common.trunc_normal, (side * side + 1, embed_dim),
                                  None, "embed")
    # block i drops the hidden of block i - 1 (block 0 has none); the final add drops block -1's
    rates = [0.0] + np.linspace(0.0, drop_path_rate, depth).tolist()[:-1]
    self.layers = nnx.List([
        Block(embed_dim, drop_path=rate, d_state=d_state, expand=expand, d_conv=d_conv,
              depth=depth, dtype=dtype, scan_backend=scan_backend, rngs=rngs)
        for rate in rates])
    self.drop_path = common.drop_path(drop_path_rate, rngs, ndim=3)
    self.norm_f = RMSNorm(embed_dim)
    self.head = common.linear(embed_dim, num_classes, ("embed", "classes"), dtype=dtype,
                              rngs=rngs)

  def position_embedding(self, grid_hw):
    """The (gh * gw + 1, D) position embedding for a token grid, cls row at gh * gw // 2."""
    pos = self.pos_embed[...]
    if tuple(grid_hw) == self.grid_size:
      return pos
    mid0 = self.grid_size[0] * self.grid_size[1] // 2
    patch_pos = jnp.concatenate([pos[:mid0], pos[mid0 + 1:]]).reshape(*self.grid_size, -1)
    patch_pos = jax.image.resize(patch_pos, (*grid_hw, pos.shape[-1]), "bilinear",
                                 antialias=False).reshape(-1, pos.shape[-1])
    mid = grid_hw[0] * grid_hw[1] // 2
    return jnp.concatenate([patch_pos[:mid], pos[mid0:mid0 + 1], patch_pos[mid:]])

  def tokens(self, x_BHW3):
    """The token sequence that enters the first block: (B, M + 1, D), cls token at M // 2."""
    _, H, W, _ = x_BHW3.shape
    if H < self.patch_size or W < self.patch_size:
      raise ValueError(f"Vim: images must be at least one patch ({self.patch_size}x"
                       f"{self.patch_size}), got {H}x{W}")
    p_BhwD = self.patch_embed(x_BHW3.astype(self.dtype))
    Bsz, gh, gw, D = p_BhwD.shape
    p_BMD = p_BhwD.reshape(Bsz, gh * gw, D)
    mid = gh * gw // 2
    cls_B1D = jnp.broadcast_to(self.cls_token[...].astype(p_BMD.dtype), (Bsz, 1, D))
    t_BLD = jnp.concatenate([p_BMD[:, :mid], cls_B1D, p_BMD[:, mid:]], axis=1)
    return t_BLD + self.position_embedding((gh, gw)).astype(t_BLD.dtype)

  def __call__(self, x_BHW3, *, return_features=False):
    hidden_BLD = self.tokens(x_BHW3)
    residual_BLD = None
    for layer in self.layers:
      hidden_BLD, residual_BLD = common.run_block(layer, self.remat, hidden_BLD, residual_BLD)
    residual_BLD = residual_BLD + self.drop_path(hidden_BLD.astype(jnp.float32))
    f_BLD = self.norm_f(residual_BLD).astype(self.dtype)
    if return_features:
      return f_BLD
    return self.head(f_BLD[:, (f_BLD.shape[1] - 1) // 2])


# Kwargs for Vim. drop_path_rate: the official training scripts' values (pt-vim-t.sh 0.0,
# pt-vim-s.sh 0.05; the stride-8 models are fine-tuned with 0.0).
PRESETS = {
    "vim_tiny": dict(embed_dim=192, depth=24, patch_size=16, stride=16, drop_path_rate=0.0),
    "vim_small": dict(embed_dim=384, depth=24, patch_size=16, stride=16, drop_path_rate=0.05),
    "vim_tiny_stride8": dict(embed_dim=192, depth=24, patch_size=16, stride=8, drop_path_rate=0.0),
    "vim_small_stride8": dict(embed_dim=384, depth=24, patch_size=16, stride=8,
                              drop_path_rate=0.0),
}
