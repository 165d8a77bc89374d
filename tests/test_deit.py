"""DeiT: exact parameter and FLOP counts, the forward pass against a float64 numpy oracle (native
and resized position embeddings), the two attention implementations against each other (values
and gradients), image-size errors, remat and drop path; configs/deit.py and init_from with a
converted DeiT. (The timm importer's tests are in test_convert_deit.py.)
"""
import functools
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from adaptor_jax.convert import deit as cd
from adaptor_jax.models import counting, registry
from adaptor_jax.models.deit import PRESETS, DeiT
from adaptor_jax.training import config as config_lib, init_from, optimizer, sharding, steps
from scan_cases import rel_err
from test_models import _train_loss_and_grads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, image_size=32, num_classes=5)


def normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@functools.cache
def abstract(name, attention="fused"):
  return nnx.eval_shape(lambda: registry.create_model(name, attention=attention,
                                                      rngs=nnx.Rngs(0)))


def out_shape(model, h, w=None, **kw):
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, h, w or h, 3), jnp.float32)
  return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, **kw), state, x).shape


@functools.cache
def tiny(attention="fused", seed=0, **overrides):
  """A 2-block DeiT (dim 32, 2 heads, patch 8: a 4x4 grid at 32x32), every param moved off its
  init (unit norms, zero biases, the ~1e-6 cls token). Made once per arguments: do not change
  it."""
  model = nnx.jit(lambda: DeiT(**{**TINY, **overrides}, attention=attention,
                               rngs=nnx.Rngs(0)))()
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda a: a + 0.3 * rng.standard_normal(a.shape), state))
  model.eval()
  return model


# -- counts ---------------------------------------------------------------------------------------

def fvcore_flops(embed_dim, depth=12, patch=16, image=224, classes=1000, mlp_ratio=4, **_):
  """fvcore's count of a ViT by hand: patch conv, per block qkv + q k^T + attn v + proj + MLP +
  two LayerNorms (5 per element), the final LayerNorm over every token, the head."""
  M, D = (image // patch) ** 2, embed_dim
  L = M + 1
  block = L * D * 3 * D + 2 * L * L * D + L * D * D + 2 * L * D * mlp_ratio * D + 2 * 5 * L * D
  return M * D * 3 * patch * patch + depth * block + 5 * L * D + D * classes


@pytest.mark.parametrize("name, params, gflops", [
    ("deit_tiny", 5_717_416, 1.3), ("deit_small", 22_050_664, 4.6),
    ("deit_base", 86_567_656, 17.6)])
def test_preset_counts_and_shapes(name, params, gflops):
  """timm's exact parameter counts; FLOPs equal the hand count for both attentions and fvcore's
  published figures (DeiT paper Table 1: 1.3 / 4.6 / 17.6 G) to rounding."""
  model = abstract(name)
  assert counting.count_params(model) == params
  flops = counting.count_flops(model, 224)
  assert flops == fvcore_flops(**PRESETS[name])
  assert abs(flops / (gflops * 1e9) - 1) <= 0.035
  if name == "deit_tiny":
    assert counting.count_flops(abstract(name, "plain"), 224) == flops
    # at 288 jax.image.resize adds two small matmuls (14x14 -> 18x14 -> 18x18 positions, once
    # per call, not per image), which fvcore, ignoring timm's F.interpolate, would not count
    resize = 192 * (18 * 14 * 14 + 18 * 18 * 14)
    assert counting.count_flops(model, 288) == fvcore_flops(**PRESETS[name], image=288) + resize
  D = PRESETS[name]["embed_dim"]
  assert out_shape(model, 224) == (1, 1000)
  assert out_shape(model, 224, return_features=True) == (1, 197, D)
  assert out_shape(model, 288, return_features=True) == (1, 18 * 18 + 1, D)  # resized positions
  assert out_shape(model, 224, 320, return_features=True) == (1, 14 * 20 + 1, D)


# -- the forward pass against numpy ---------------------------------------------------------------

def resize_axis(a, axis, n_out):
  """Half-pixel linear interpolation along `axis` (align_corners=False), edges clamped."""
  n_in = a.shape[axis]
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).reshape([-1 if i == axis else 1 for i in range(a.ndim)])
  return np.take(a, lo, axis) * (1 - frac) + np.take(a, hi, axis) * frac


def numpy_deit(model, x):
  """DeiT in float64 numpy: explicit patchify, cls first, positions resized per axis, pre-norm
  blocks with per-head softmax attention and exact GELU, final LayerNorm, head on cls."""
  f = lambda v: np.asarray(v[...], np.float64)
  erf = np.vectorize(math.erf)

  def ln(t, norm):
    mu = t.mean(-1, keepdims=True)
    return (t - mu) / np.sqrt(t.var(-1, keepdims=True) + 1e-6) * f(norm.scale) + f(norm.bias)

  def lin(t, layer):
    return t @ f(layer.kernel) + f(layer.bias)

  x = np.asarray(x, np.float64)
  P, (g0h, g0w) = model.patch_size, model.grid_size
  Bsz, H, W, _ = x.shape
  gh, gw = H // P, W // P
  patches = x.reshape(Bsz, gh, P, gw, P, 3).transpose(0, 1, 3, 2, 4, 5)
  t = np.einsum("bijpqc,pqcd->bijd", patches, f(model.patch_embed.kernel))
  t = (t + f(model.patch_embed.bias)).reshape(Bsz, gh * gw, -1)
  pos = f(model.pos_embed)
  grid = resize_axis(resize_axis(pos[1:].reshape(g0h, g0w, -1), 0, gh), 1, gw)
  cls = np.broadcast_to(f(model.cls_token), (Bsz, 1, t.shape[-1]))
  t = np.concatenate([cls, t], 1) + np.concatenate([pos[:1], grid.reshape(gh * gw, -1)])
  for blk in model.blocks:
    N = blk.attn.num_heads
    q, k, v = np.split(lin(ln(t, blk.norm1), blk.attn.qkv), 3, axis=-1)
    heads = lambda a: a.reshape(Bsz, a.shape[1], N, -1)
    logits = np.einsum("btnh,bsnh->bnts", heads(q), heads(k)) / np.sqrt(q.shape[-1] // N)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", probs, heads(v)).reshape(t.shape)
    t = t + lin(o, blk.attn.proj)
    h = lin(ln(t, blk.norm2), blk.mlp.fc1)
    t = t + lin(0.5 * h * (1 + erf(h / np.sqrt(2))), blk.mlp.fc2)
  feats = ln(t, model.norm)
  return lin(feats[:, 0], model.head), feats


@pytest.mark.parametrize("attention, sizes", [
    ("fused", ((32, 32), (48, 48), (24, 24), (32, 48))), ("plain", ((32, 32),))])
def test_forward_matches_numpy_oracle(attention, sizes):
  """At the trained 4x4 grid, upsampled to 6x6, downsampled to 3x3, and non-square (4x6); the
  plain attention at 4x4 (it follows the fused one at 5x5 below)."""
  model = tiny(attention)
  run = nnx.jit(lambda m, x: (m(x), m(x, return_features=True)))
  for h, w in sizes:
    x = normal(h + w, 2, h, w, 3)
    logits, feats = run(model, x)
    want_logits, want_feats = numpy_deit(model, x)
    assert logits.shape == (2, 5) and feats.shape == (2, (h // 8) * (w // 8) + 1, 32)
    assert rel_err(logits, want_logits) <= 1e-5, (h, w)
    assert rel_err(feats, want_feats) <= 1e-5, (h, w)


def test_position_embedding_resize():
  model = tiny()
  pos = np.asarray(model.pos_embed[...])
  np.testing.assert_array_equal(model.position_embedding((4, 4)), pos)  # identity when trained
  got = np.asarray(model.position_embedding((6, 3)))
  assert got.shape == (6 * 3 + 1, 32)
  np.testing.assert_array_equal(got[0], pos[0])  # the cls row untouched
  want = resize_axis(resize_axis(pos[1:].reshape(4, 4, 32), 0, 6), 1, 3).reshape(18, 32)
  assert rel_err(got[1:], want) <= 1e-6


def test_attention_implementations_agree_with_gradients():
  """The same weights with attention fused and plain: logits, and gradients of a loss with
  respect to every param and to the images, to float32 rounding."""
  models = [tiny("fused"), tiny("plain")]
  x, w_out = normal(7, 2, 40, 40, 3), normal(8, 2, 5)

  def loss_and_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x) * w_out)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

  (loss_f, (gp_f, gx_f)), (loss_p, (gp_p, gx_p)) = map(loss_and_grads, models)
  assert rel_err(loss_f, loss_p) <= 1e-5
  assert rel_err(gx_f, gx_p) <= 1e-5
  flat_f, flat_p = jax.tree.leaves(gp_f), jax.tree.leaves(gp_p)
  assert len(flat_f) == len(flat_p) == 2 * 12 + 8
  for a, b in zip(flat_f, flat_p):
    assert np.abs(np.asarray(b)).max() > 0
    assert rel_err(a, b) <= 1e-5


def test_bfloat16_compute_follows_float32():
  f32 = tiny()
  bf16 = nnx.jit(lambda: DeiT(**TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))()
  nnx.update(bf16, nnx.state(f32, nnx.Param))
  bf16.eval()
  x = normal(9, 2, 32, 32, 3)
  y32, y16 = nnx.jit(lambda a, b, x: (a(x), b(x)))(f32, bf16, x)
  assert y16.dtype == jnp.bfloat16
  assert rel_err(y16.astype(jnp.float32), y32) <= 3e-2


def test_remat_keeps_the_numerics():
  """remat="full" (each block recomputed in the backward pass), drop path live: the loss and
  every gradient as without remat (test_models.py checks the policies themselves)."""
  make = lambda remat: DeiT(**TINY, drop_path_rate=0.5, remat=remat, rngs=nnx.Rngs(0))
  x = normal(10, 2, 32, 32, 3)
  (loss, grads), _ = _train_loss_and_grads(make, "none", x)
  (loss_r, grads_r), jaxpr = _train_loss_and_grads(make, "full", x)
  assert "checkpoint" in jaxpr or "remat" in jaxpr
  assert rel_err(loss_r, loss) <= 1e-6
  for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
    assert rel_err(a, b) <= 1e-5


def test_drop_path_rates_and_whole_branches():
  model = DeiT(**{**TINY, "depth": 4}, drop_path_rate=0.3, rngs=nnx.Rngs(0))
  np.testing.assert_allclose([b.drop_path.rate for b in model.blocks], [0.0, 0.1, 0.2, 0.3])
  block = DeiT(**TINY, drop_path_rate=1.0, rngs=nnx.Rngs(0, dropout=1)).blocks[-1]
  t = normal(11, 2, 17, 32)
  block.train()
  np.testing.assert_array_equal(block(t), t)  # both residual branches dropped
  block.eval()
  assert rel_err(block(t), t) > 1e-3


def test_bad_sizes_and_arguments_are_one_line_errors():
  model = abstract("deit_tiny")
  for h, w in ((230, 230), (224, 200), (8, 8)):
    with pytest.raises(ValueError) as e:
      out_shape(model, h, w)
    assert str(e.value).splitlines()[0] == (  # jax appends its traceback note on other lines
        f"DeiT: image height and width must be positive multiples of the patch size 16, got "
        f"{h}x{w}")
  for kwargs, message in ((dict(image_size=100), "image_size 100 is not a positive multiple"),
                          (dict(attention="flash"), "attention must be one of"),
                          (dict(remat="some"), "remat must be one of"),
                          (dict(num_heads=5), "embed_dim 32 is not divisible by num_heads 5")):
    with pytest.raises(ValueError, match=f"^DeiT: {message}"):
      DeiT(**{**TINY, **kwargs}, rngs=nnx.Rngs(0))


def test_logical_axes_and_fsdp_shard_every_matrix():
  """Axes from common.py's names plus "heads"; on fsdp=4 every param of deit_tiny but the qkv
  bias (all "heads") is split, along "embed", "mlp" or "classes"."""
  allowed = {"embed", "mlp", "classes", "heads", None}
  for path, var in nnx.to_flat_state(nnx.state(abstract("deit_tiny"), nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == len(var.shape) and set(axes) <= allowed, path
    spec = sharding.param_spec(axes, var.shape, 4)
    split = [a for a, s in zip(axes, spec) if s == "fsdp"]
    if path[-2:] == ("qkv", "bias"):
      assert not split, path  # (3 D,) of "heads": not sharded
    else:
      assert split and split[0] in ("embed", "mlp", "classes"), (path, axes, spec)


def test_weight_decay_skips_tokens_norms_and_biases():
  mask = dict(nnx.to_flat_state(nnx.State(registry.decay_mask(
      nnx.to_pure_dict(nnx.state(abstract("deit_tiny"), nnx.Param))))))
  decayed = sorted({p[-1] for p, d in mask.items() if d})
  assert decayed == ["kernel"]
  assert not mask[("cls_token",)] and not mask[("pos_embed",)]
  assert sum(mask.values()) == 1 + 12 * 4 + 1  # patch conv, qkv/proj/fc1/fc2, head


# -- training: the config file and init_from ------------------------------------------------------

def load_config(arg):
  spec = importlib.util.spec_from_file_location("deit_config", os.path.join(REPO, "configs",
                                                                              "deit.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_config_file():
  for size in ("tiny", "small", "base"):
    c = config_lib.validate(load_config(size))
    assert c.model == f"deit_{size}"
    assert c.lr * c.batch_size / c.lr_base_batch == pytest.approx(1e-3)  # 5e-4 x 1024 / 512
    assert c.warmup_lr * c.batch_size / c.lr_base_batch == pytest.approx(1e-6)
    assert c.min_lr * c.batch_size / c.lr_base_batch == pytest.approx(1e-5)
    assert steps.model_kwargs(c, 1000)["attention"] == "fused"
    assert "scan_backend" not in steps.model_kwargs(c, 1000)
  with pytest.raises(ValueError, match="the variants are tiny, small, base"):
    load_config("huge")
  for key, value in (("form", "booster"), ("train_only", "head"), ("scan_backend", "xla")):
    c = load_config("tiny")
    c[key] = value
    c.init_from = "/somewhere"
    with pytest.raises(ValueError, match=rf"^config\.{key}: "):
      config_lib.validate(c)


def test_init_from_a_converted_deit(tmp_path):
  """A run of a (small) deit_tiny starts from the converter's output: its logits at step 0."""
  converted = tiny(num_classes=10)
  cd.save(converted, "deit_tiny", tmp_path / "converted")
  c = load_config("tiny")
  overrides = {k: v for k, v in TINY.items() if k != "num_classes"}
  c.model_overrides = ml_collections.ConfigDict(dict(overrides, attention="fused"))
  c.update(dict(dtype="float32", num_classes=10, init_from=str(tmp_path / "converted")))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), jax.devices()[:1])
  tx = optimizer.make(c, 10)
  net, state, shardings = steps.create(c, 10, mesh, tx)
  state = init_from.apply(state, shardings, c, str(tmp_path))
  x = normal(12, 2, 32, 32, 3)
  got = net.model(state["params"], train=False)(x)
  assert rel_err(got, converted(x)) <= 1e-6
