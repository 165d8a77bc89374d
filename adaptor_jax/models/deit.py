"""DeiT (Touvron et al. 2021, "Training data-efficient image transformers"): a plain ViT.

The architecture of timm's deit_{tiny,small,base}_patch16_224 (the distillation-free models):
images (B, H, W, 3) -> Conv(kernel = stride = 16) patches, M tokens in row-major order -> a learned
cls token prepended -> + a learned absolute position embedding (M0 + 1 rows, M0 the token count
at `image_size`, the cls row first; the patch rows bilinearly resized for other grids) ->
`depth` pre-norm blocks -> LayerNorm -> the cls token's output -> Linear head. Blocks:
  x = x + DropPath(Attention(LN(x)));  x = x + DropPath(MLP(LN(x)))
with LayerNorm eps 1e-6, multi-head self-attention through one fused qkv Linear (with bias;
its 3 D outputs are q, k, v, each split into heads head-major, as timm's) and an output
projection, an MLP of ratio 4 with exact GELU; block i drops with rate
linspace(0, drop_path_rate, depth)[i]. The residual stream is float32; the blocks compute in
`dtype`.

Images may have any height and width that are multiples of the patch size (timm's rule with
dynamic_img_size), non-square included.

attention: "fused" (default) is `jax.nn.dot_product_attention` with implementation=None, which
leaves the kernel to jax: jax 0.10.2 always takes its XLA implementation there (the same einsums
and float32 softmax as "plain"; cuDNN's flash attention only when named, implementation="cudnn"),
and a jax that picks a fused kernel per platform gets it here unchanged. "plain" is the explicit
softmax(Q K^T / sqrt(d)) V, logits and softmax in float32. Both give the same numbers to float32
rounding (tests/test_deit.py) and the same FLOP count.

Logical axes: "embed", "mlp", "classes" as common.py documents; "heads" marks the q/k/v and
attention-output axis (all heads together), which the FSDP rules (training/sharding.py) do not
shard, so the qkv and proj weights split along "embed".
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptor_jax.models import common
from adaptor_jax.models.vmamba import Mlp  # fc1 -> exact GELU -> fc2, VMamba's and timm's

ATTENTION = ("fused", "plain")


# Params that never decay, besides every 1-D param and every bias (timm's no_weight_decay).
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")


class LayerNorm(common.LayerNorm):
  """common.LayerNorm (the counted `layer_norm` op) with timm's ViT eps, 1e-6."""

  def __init__(self, dim, *, eps=1e-6):
    super().__init__(dim)
    self.eps = eps

  def __call__(self, x):
    return common.layer_norm(x, self.scale[...], self.bias[...], self.eps)


def plain_attention(q_BLNH, k_BLNH, v_BLNH):
  """softmax(q k^T / sqrt(H)) v per head; logits and softmax in float32, output in v's dtype."""
  scale = 1.0 / np.sqrt(q_BLNH.shape[-1])
  logits_BNLL = jnp.einsum("btnh,bsnh->bnts", q_BLNH, k_BLNH,
                           preferred_element_type=jnp.float32) * scale
  probs_BNLL = jax.nn.softmax(logits_BNLL, axis=-1).astype(v_BLNH.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs_BNLL, v_BLNH)


class Attention(nnx.Module):
  """Multi-head self-attention on (B, L, D): qkv Linear (D -> 3D), attention, proj (D -> D)."""

  def __init__(self, dim, num_heads, *, attention, dtype, rngs):
    if dim % num_heads:
      raise ValueError(f"DeiT: embed_dim {dim} is not divisible by num_heads {num_heads}")
    self.num_heads, self.attention = num_heads, attention
    self.qkv = common.linear(dim, 3 * dim, ("embed", "heads"), dtype=dtype, rngs=rngs)
    self.proj = common.linear(dim, dim, ("heads", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x_BLD):
    Bsz, L, D = x_BLD.shape
    qkv_BL3NH = self.qkv(x_BLD).reshape(Bsz, L, 3, self.num_heads, D // self.num_heads)
    q_BLNH, k_BLNH, v_BLNH = (qkv_BL3NH[:, :, i] for i in range(3))
    if self.attention == "fused":
      o_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BLNH, v_BLNH)
    else:
      o_BLNH = plain_attention(q_BLNH, k_BLNH, v_BLNH)
    return self.proj(o_BLNH.reshape(Bsz, L, D))


class Block(nnx.Module):
  """x + DropPath(attn(norm1(x))), then + DropPath(mlp(norm2(x))); x float32 (B, L, D)."""

  def __init__(self, dim, num_heads, *, mlp_ratio, drop_path, attention, dtype, rngs):
    self.dtype = dtype
    self.norm1 = LayerNorm(dim)
    self.attn = Attention(dim, num_heads, attention=attention, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path = common.drop_path(drop_path, rngs, ndim=3)

  def __call__(self, x_BLD):
    h_BLD = self.attn(self.norm1(x_BLD).astype(self.dtype))
    x_BLD = x_BLD + self.drop_path(h_BLD.astype(jnp.float32))
    h_BLD = self.mlp(self.norm2(x_BLD).astype(self.dtype))
    return x_BLD + self.drop_path(h_BLD.astype(jnp.float32))


class DeiT(nnx.Module):
  """DeiT / ViT with a cls token. Takes images (B, H, W, 3), H and W multiples of patch_size;
  returns logits (B, num_classes), or with return_features=True the final normed token sequence
  (B, M + 1, D), cls token first. remat: how each block's activations are kept for the backward
  pass (common.REMAT); attention: one of ATTENTION (see the module docstring)."""

  def __init__(self, *, embed_dim, depth=12, num_heads, patch_size=16, mlp_ratio=4.0,
               num_classes=1000, image_size=224, drop_path_rate=0.0, attention="fused",
               dtype=jnp.float32, remat="none", rngs: nnx.Rngs):
    common.check_remat(remat, "DeiT")
    if attention not in ATTENTION:
      raise ValueError(f"DeiT: attention must be one of {ATTENTION}, got {attention!r}")
    if image_size < patch_size or image_size % patch_size:
      raise ValueError(f"DeiT: image_size {image_size} is not a positive multiple of the patch "
                       f"size {patch_size}")
    self.embed_dim, self.depth, self.patch_size = embed_dim, depth, patch_size
    self.dtype, self.remat, self.attention = dtype, remat, attention
    side = image_size // patch_size
    self.grid_size = (side, side)
    fan_in = 3 * patch_size * patch_size  # PyTorch's default Conv2d init, as timm keeps it
    self.patch_embed = nnx.Conv(
        3, embed_dim, (patch_size, patch_size), strides=patch_size, padding="VALID",
        dtype=dtype,
        kernel_init=common.logical(common.fan_in_uniform(fan_in), None, None, None, "embed"),
        bias_init=common.logical(common.fan_in_uniform(fan_in), "embed"), rngs=rngs)
    self.cls_token = common.param(rngs, nnx.initializers.normal(1e-6), (embed_dim,), "embed")
    self.pos_embed = common.param(rngs, common.trunc_normal, (side * side + 1, embed_dim),
                                  None, "embed")
    rates = np.linspace(0.0, drop_path_rate, depth).tolist()
    self.blocks = nnx.List([
        Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, drop_path=rate, attention=attention,
              dtype=dtype, rngs=rngs)
        for rate in rates])
    self.norm = LayerNorm(embed_dim)
    self.head = common.linear(embed_dim, num_classes, ("embed", "classes"), dtype=dtype,
                              rngs=rngs)

  def position_embedding(self, grid_hw):
    """The (gh * gw + 1, D) position embedding for a token grid: the cls row first, as learned;
    the patch rows bilinearly resized (half-pixel centres, no antialiasing) from the learned
    grid; the learned embedding itself at that grid."""
    pos = self.pos_embed[...]
    if tuple(grid_hw) == self.grid_size:
      return pos
    patch_pos = pos[1:].reshape(*self.grid_size, pos.shape[-1])
    patch_pos = jax.image.resize(patch_pos, (*grid_hw, pos.shape[-1]), "bilinear",
                                 antialias=False)
    return jnp.concatenate([pos[:1], patch_pos.reshape(-1, pos.shape[-1])])

  def tokens(self, x_BHW3):
    """The token sequence that enters the first block: (B, M + 1, D) float32, cls token first."""
    _, H, W, _ = x_BHW3.shape
    P = self.patch_size
    if H < P or W < P or H % P or W % P:
      raise ValueError(f"DeiT: image height and width must be positive multiples of the patch "
                       f"size {P}, got {H}x{W}")
    p_BhwD = self.patch_embed(x_BHW3.astype(self.dtype))
    Bsz, gh, gw, D = p_BhwD.shape
    p_BMD = p_BhwD.reshape(Bsz, gh * gw, D).astype(jnp.float32)
    cls_B1D = jnp.broadcast_to(self.cls_token[...], (Bsz, 1, D))
    t_BLD = jnp.concatenate([cls_B1D, p_BMD], axis=1)
    return t_BLD + self.position_embedding((gh, gw))

  def __call__(self, x_BHW3, *, return_features=False):
    x_BLD = self.tokens(x_BHW3)
    for block in self.blocks:
      x_BLD = common.run_block(block, self.remat, x_BLD)
    f_BLD = self.norm(x_BLD).astype(self.dtype)
    if return_features:
      return f_BLD
    return self.head(f_BLD[:, 0])


# Kwargs for DeiT. drop_path_rate 0.1: DeiT's training recipe (its main.py default) for all three.
PRESETS = {
    "deit_tiny": dict(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    "deit_small": dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
    "deit_base": dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1),
}
