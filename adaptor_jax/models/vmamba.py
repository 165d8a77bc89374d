"""The VMamba v2 backbone and the three ways Mamba-Adaptor goes into it (DESIGN.md §3).

form="none"      plain VMamba (vmamba_tiny/small/base).
form="backbone"  Mamba-Adaptor-bX: every SS2D carries Adaptor-T and Adaptor-S, gamma = 1.
form="booster"   a (pretrained) VMamba with Adaptor-T/S inserted; gamma and the Adaptor-S convs start
                 at zero, so at step 0 the model equals the VMamba it boosts; everything trains.
form="adaptor"   transfer learning: the same zero-initialised adaptors form a parallel branch whose
                 output is added to the frozen SS2D core output (before its out_norm, so the branch
                 needs no projection of its own), K = 8 points by default (adaptor.PARALLEL);
                 `share_adaptor=True` lets the blocks of a stage use one adaptor;
                 `trainable(model)` names what trains (adaptors, head, optionally norms).
"""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptor_jax.models import adaptor as adaptor_lib, common
from adaptor_jax.models.adaptor import AdaptorConfig, AdaptorS, AdaptorT
from adaptor_jax.models.ss2d import SS2D

FORMS = ("none", "backbone", "booster", "adaptor")


class Mlp(nnx.Module):

  def __init__(self, dim, hidden, *, dtype, rngs):
    self.fc1 = common.linear(dim, hidden, ("embed", "mlp"), dtype=dtype, rngs=rngs)
    self.fc2 = common.linear(hidden, dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(common.gelu(self.fc1(x)))


class VSSBlock(nnx.Module):
  """x += DropPath(SS2D(LN(x))); x += DropPath(MLP(LN(x)))."""

  def __init__(self, dim, *, drop_path, ssm_ratio, d_state, mlp_ratio, adaptor_t, adaptor_s,
               dtype, scan_backend, rngs):
    self.norm = common.LayerNorm(dim)
    self.op = SS2D(dim, ssm_ratio=ssm_ratio, d_state=d_state, adaptor_t=adaptor_t,
                   adaptor_s=adaptor_s, dtype=dtype, scan_backend=scan_backend, rngs=rngs)
    self.norm2 = common.LayerNorm(dim)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path = common.drop_path(drop_path, rngs)

  def __call__(self, x_BHWC):
    x_BHWC = x_BHWC + self.drop_path(self.op(self.norm(x_BHWC)))
    return x_BHWC + self.drop_path(self.mlp(self.norm2(x_BHWC)))


class PatchEmbed(nnx.Module):
  """"v2": conv3x3 s2 (C/2) -> LN -> GELU -> conv3x3 s2 (C) -> LN; 4x downsampling."""

  def __init__(self, dim, *, dtype, rngs):
    self.conv1 = common.conv(3, dim // 2, 3, stride=2, dtype=dtype, rngs=rngs)
    self.norm1 = common.LayerNorm(dim // 2)
    self.conv2 = common.conv(dim // 2, dim, 3, stride=2, dtype=dtype, rngs=rngs)
    self.norm2 = common.LayerNorm(dim)

  def __call__(self, x_BHW3):
    return self.norm2(self.conv2(common.gelu(self.norm1(self.conv1(x_BHW3)))))


class Downsample(nnx.Module):
  """"v3": conv3x3 s2 -> LN."""

  def __init__(self, dim, out_dim, *, dtype, rngs):
    self.conv = common.conv(dim, out_dim, 3, stride=2, dtype=dtype, rngs=rngs)
    self.norm = common.LayerNorm(out_dim)

  def __call__(self, x_BHWC):
    return self.norm(self.conv(x_BHWC))


class VSSM(nnx.Module):
  """VMamba v2 backbone: patch embed, 4 stages of VSS blocks with downsampling, head LN-pool-Linear.

  remat: how each VSS block's activations are kept for the backward pass (common.REMAT).
  num_classes=0 builds no classifier (head_norm, head): a backbone for dense heads.
  Takes images (B, H, W, 3); returns logits (B, num_classes), or with return_features=True the four
  stage outputs (B, H/4, W/4, d0), (B, H/8, W/8, d1), (B, H/16, W/16, d2), (B, H/32, W/32, d3),
  each taken before the stage's downsampling (ceil division for odd sizes).
  """

  def __init__(self, *, dims, depths, ssm_ratio, d_state=1, mlp_ratio=4.0, num_classes=1000,
               drop_path_rate=0.0, form="none", adaptor: AdaptorConfig | None = None,
               share_adaptor=False, dtype=jnp.float32, scan_backend="auto", remat="none",
               rngs: nnx.Rngs):
    if form not in FORMS:
      raise ValueError(f"VSSM: form must be one of {FORMS}, got {form!r}")
    if len(dims) != len(depths):
      raise ValueError(f"VSSM: dims {dims} and depths {depths} differ in length")
    if share_adaptor and form != "adaptor":
      raise ValueError("VSSM: share_adaptor=True only applies to form='adaptor'")
    common.check_remat(remat, "VSSM")
    default = adaptor_lib.PARALLEL if form == "adaptor" else AdaptorConfig()
    adaptor = (adaptor or default) if form != "none" else None
    self.form, self.dims, self.depths, self.remat = form, tuple(dims), tuple(depths), remat
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    self.patch_embed = PatchEmbed(dims[0], dtype=dtype, rngs=rngs)
    self.stages = nnx.List()
    for i, (dim, depth) in enumerate(zip(dims, depths)):
      d_inner = int(ssm_ratio * dim)

      def make_adaptors():
        if adaptor is None:
          return None, None
        zero = form != "backbone"
        return (AdaptorT(d_inner, adaptor, gamma_init=0.0 if zero else 1.0, dtype=dtype, rngs=rngs),
                AdaptorS(d_inner, adaptor, zero_init=zero, dtype=dtype, rngs=rngs))

      shared = make_adaptors() if share_adaptor else None
      blocks = nnx.List()
      for j in range(depth):
        adaptor_t, adaptor_s = shared or make_adaptors()
        blocks.append(VSSBlock(dim, drop_path=rates[sum(depths[:i]) + j], ssm_ratio=ssm_ratio,
                               d_state=d_state, mlp_ratio=mlp_ratio, adaptor_t=adaptor_t,
                               adaptor_s=adaptor_s, dtype=dtype, scan_backend=scan_backend,
                               rngs=rngs))
      self.stages.append(nnx.Dict(
          blocks=blocks,
          downsample=(Downsample(dim, dims[i + 1], dtype=dtype, rngs=rngs)
                      if i + 1 < len(dims) else None)))
    if num_classes:
      self.head_norm = common.LayerNorm(dims[-1])
      self.head = common.linear(dims[-1], num_classes, ("embed", "classes"), dtype=dtype,
                                rngs=rngs)
    else:  # a backbone for dense heads (upernet.py)
      self.head_norm = self.head = None

  def __call__(self, x_BHW3, *, return_features=False):
    x = self.patch_embed(x_BHW3)
    features = []
    for stage in self.stages:
      for block in stage["blocks"]:
        x = common.run_block(block, self.remat, x)
      features.append(x)
      if stage["downsample"] is not None:
        x = stage["downsample"](x)
    if return_features:
      return features
    if self.head is None:
      raise ValueError("VSSM: built with num_classes=0 (no classifier): call it with "
                       "return_features=True")
    return self.head(common.global_avg_pool(self.head_norm(x)))


# Params that never decay, besides every 1-D param and every bias: the SSM's constants and the
# adaptor's gain (VMamba's no_weight_decay list).
NO_WEIGHT_DECAY = ("A_log", "D", "dt_bias", "gamma")


def trainable(model, *, norms=False, head_only=False):
  """The nnx filter of the params that train.

  For form="adaptor": the adaptors and the classifier (head_norm, head), plus every LayerNorm when
  norms=True; everything else is frozen. For the other forms: every param. head_only=True (any
  form): linear probing, only the classifier trains.
  Use it as `nnx.Optimizer(model, tx, wrt=trainable(model))` or `nnx.DiffState(0, ...)`.
  """
  if head_only:
    keys = ["head", "head_norm"]
  elif getattr(model, "form", "none") != "adaptor":
    return nnx.Param
  else:
    keys = ["adaptor_t", "adaptor_s", "head", "head_norm"]
  if norms:
    keys += ["norm", "norm1", "norm2", "out_norm"]
  return nnx.All(nnx.Param, nnx.Any(*[nnx.PathContains(k) for k in keys]))


def trainable_mask(model, *, norms=False, head_only=False):
  """A pytree of bools shaped like nnx.state(model, nnx.Param): True where the param trains.

  To freeze the rest with optax:
    optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask)
  (optax.masked(tx, mask) alone would pass the frozen params' raw gradients through).
  """
  is_trainable = nnx.filterlib.to_predicate(trainable(model, norms=norms, head_only=head_only))
  params = nnx.state(model, nnx.Param)
  flat = [(path, bool(is_trainable(path, var))) for path, var in nnx.to_flat_state(params)]
  return nnx.from_flat_state(flat)
