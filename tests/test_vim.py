"""Vim: shapes, the bidirectional Mamba mixer against a flip-based oracle, the middle cls token,
gradients, and the parameter / FLOP counts of the presets."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels
from adaptor_jax.models import counting
from adaptor_jax.models.vim import PRESETS, BiMamba, Vim
from scan_cases import rel_err


@functools.cache
def abstract_vim(name):
  """The preset without values (creating 24 layers is the slow part: seconds, so done once)."""
  return nnx.eval_shape(lambda: Vim(**PRESETS[name], rngs=nnx.Rngs(0)))


def out_shape(model, image, **kw):
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, image, image, 3), jnp.float32)
  return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, **kw), state, x).shape


def normal(seed, *shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# The small models run with the xla backend, the one "auto" picks on CPU, without tracing the Pallas
# branches that "auto" also traces (tests/test_scan.py covers the dispatch).
@functools.cache
def tiny_vim():
  """embed 16, depth 2, patch 8: a 4x4 token grid at its image_size 32. Created once (jitted)."""
  return nnx.jit(lambda: Vim(embed_dim=16, depth=2, patch_size=8, stride=8, d_state=4,
                             num_classes=5, image_size=32, scan_backend="xla",
                             rngs=nnx.Rngs(0)))()


def test_vim_tiny_output_shapes():
  model = abstract_vim("vim_tiny")
  assert out_shape(model, 224) == (1, 1000)
  assert out_shape(model, 64) == (1, 1000)  # 4x4 tokens: position embedding resized from 14x14
  assert out_shape(model, 224, return_features=True) == (1, 14 * 14 + 1, 192)
  assert out_shape(model, 64, return_features=True) == (1, 4 * 4 + 1, 192)
  stride8 = nnx.eval_shape(lambda: Vim(embed_dim=16, depth=2, stride=8, rngs=nnx.Rngs(0)))
  assert out_shape(stride8, 224, return_features=True) == (1, 27 * 27 + 1, 16)
  with pytest.raises(ValueError, match="at least one patch"):
    out_shape(model, 15)


# -- the mixer against an oracle that flips the sequence ------------------------------------------

def oracle_mixer(p, h_BLD):
  """Official bimamba v2 on materialised flipped copies: PyTorch's causal conv1d written as a loop,
  the reference scan run forward on the flipped sequence, flipped back."""
  xz = h_BLD @ p["in_proj"]["kernel"]
  x, z = jnp.split(xz, 2, axis=-1)
  N = p["A_log"].shape[1]

  def direction(x, z, sfx):
    w, b = p["conv1d" + sfx]["weight"], p["conv1d" + sfx]["bias"]
    K, L = w.shape[0], x.shape[1]
    xpad = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
    u = jax.nn.silu(b + sum(w[k] * xpad[:, k:k + L] for k in range(K)))
    dbl = u @ p["x_proj" + sfx]["kernel"]
    R = dbl.shape[-1] - 2 * N
    dt, B, C = dbl[..., :R], dbl[..., R:R + N], dbl[..., R + N:]
    dt_proj = p["dt_proj" + sfx]
    return kernels.selective_scan(
        u, dt @ dt_proj["kernel"], -jnp.exp(p["A" + sfx + "_log"]), B[:, :, None], C[:, :, None],
        p["D" + sfx], z, dt_proj["bias"], delta_softplus=True, backend="reference")

  y_f = direction(x, z, "")
  y_b = direction(x[:, ::-1], z[:, ::-1], "_b")[:, ::-1]
  return ((y_f + y_b) / 2) @ p["out_proj"]["kernel"]


def test_bimamba_matches_flip_oracle():
  mixer = nnx.jit(lambda: BiMamba(16, d_state=4, depth=2, scan_backend="xla",
                                   rngs=nnx.Rngs(1)))()
  graphdef, state = nnx.split(mixer)
  leaves, treedef = jax.tree.flatten(state)
  # fresh weights: every param moved off its init (D = 1, A_log = log n, the dt bias...)
  leaves = [l + 0.3 * normal(i, *l.shape) * (float(np.abs(l).mean()) + 0.1)
            for i, l in enumerate(leaves)]
  state = jax.tree.unflatten(treedef, leaves)
  h, w_out = normal(100, 2, 13, 16), normal(101, 2, 13, 16)

  def model_loss(state, h):
    y = nnx.merge(graphdef, state)(h)
    return (y * w_out).sum(), y

  def oracle_loss(p, h):
    y = oracle_mixer(p, h)
    return (y * w_out).sum(), y

  @jax.jit
  def both(state, h):
    grad = lambda f, p: jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, h)
    return grad(model_loss, state), grad(oracle_loss, nnx.to_pure_dict(state))

  ((_, y), (g_state, g_h)), ((_, y_ref), (g_ref, g_h_ref)) = both(state, h)
  assert rel_err(y, y_ref) <= 1e-5
  assert rel_err(g_h, g_h_ref) <= 1e-4
  got = dict(nnx.to_flat_state(nnx.State(nnx.to_pure_dict(g_state))))
  ref = dict(nnx.to_flat_state(nnx.State(g_ref)))
  assert sorted(got) == sorted(ref) and len(got) == 16
  for path in ref:
    assert rel_err(got[path], ref[path]) <= 1e-4, path


# -- the token sequence and the middle cls token --------------------------------------------------

def bilinear_np(a_HWD, out_h, out_w):
  """Half-pixel bilinear resize (PyTorch's align_corners=False), separable, edges clamped."""
  def axis_weights(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    W = np.zeros((n_out, n_in))
    W[np.arange(n_out), lo] += 1 - (src - lo)
    W[np.arange(n_out), hi] += src - lo
    return W
  return np.einsum("ih,jw,hwd->ijd", axis_weights(a_HWD.shape[0], out_h),
                   axis_weights(a_HWD.shape[1], out_w), a_HWD)


def expected_tokens(model, x):
  """Patches (explicit patchify), cls inserted at M // 2, position embedding (numpy resize)."""
  x = np.asarray(x, np.float64)
  P = model.patch_size
  Bsz, H, W, _ = x.shape
  gh, gw = H // P, W // P
  patches = x[:, :gh * P, :gw * P].reshape(Bsz, gh, P, gw, P, 3).transpose(0, 1, 3, 2, 4, 5)
  kernel = np.asarray(model.patch_embed.kernel[...], np.float64)
  p = np.einsum("bijpqc,pqcd->bijd", patches, kernel) + np.asarray(model.patch_embed.bias[...])
  p = p.reshape(Bsz, gh * gw, -1)
  pos = np.asarray(model.pos_embed[...], np.float64)
  g0 = model.grid_size
  mid0, mid = g0[0] * g0[1] // 2, gh * gw // 2
  patch_pos = np.concatenate([pos[:mid0], pos[mid0 + 1:]]).reshape(*g0, -1)
  patch_pos = bilinear_np(patch_pos, gh, gw).reshape(gh * gw, -1)
  cls = np.broadcast_to(np.asarray(model.cls_token[...]), (Bsz, 1, p.shape[-1]))
  return (np.concatenate([p[:, :mid], cls, p[:, mid:]], axis=1)
          + np.concatenate([patch_pos[:mid], pos[mid0:mid0 + 1], patch_pos[mid:]]))


def test_tokens_put_cls_in_the_middle():
  model = tiny_vim()
  tokens = nnx.jit(lambda m, x: m.tokens(x))
  for image in (32, 48, 24):  # native 4x4 grid, 6x6 (upsampled positions), 3x3 (downsampled)
    x = normal(image, 2, image, image, 3)
    got, ref = tokens(model, x), expected_tokens(model, x)
    assert got.shape == ref.shape == (2, (image // 8) ** 2 + 1, 16)
    assert rel_err(got, ref) <= 1e-5, image


def test_head_reads_the_middle_token():
  model = tiny_vim()
  x = normal(3, 2, 40, 40, 3)  # 5x5 = 25 patches: cls at 12

  @nnx.jit
  def run(model, x):
    return model(x), model(x, return_features=True)

  logits, feats = run(model, x)
  assert feats.shape == (2, 26, 16)
  head = lambda f: np.asarray(f) @ np.asarray(model.head.kernel[...]) + np.asarray(
      model.head.bias[...])
  errs = [rel_err(logits, head(feats[:, j])) for j in range(26)]
  assert errs[12] <= 1e-6
  assert min(errs[:12] + errs[13:]) > 1e-2


def test_every_parameter_gets_a_gradient():
  model = tiny_vim()
  x = normal(4, 2, 32, 32, 3)
  labels = jnp.array([1, 3])

  @nnx.jit
  def grads(model, x):
    def loss(model):
      logp = jax.nn.log_softmax(model(x))
      return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean()
    return nnx.grad(loss)(model)

  flat = nnx.to_flat_state(grads(model, x))
  assert len(flat) == 7 + 2 * 17
  for path, g in flat:
    g = np.asarray(g[...])
    assert np.isfinite(g).all() and np.abs(g).max() > 0, path


# -- parameter and FLOP counts --------------------------------------------------------------------

def localmamba_flops(embed_dim, stride=16, depth=24, d_state=16, image=224, patch=16, **_):
  """The hand count (LocalMamba's VisionMamba.flops) that the published Vim 1.5G / 5.1G come from:
  196 tokens (no cls), conv1d, x_proj and dt_proj counted once, scan 5LDN + 2LD per direction,
  a LayerNorm of L*D per layer, patch embed and a 1000-class head."""
  L = ((image - patch) // stride + 1) ** 2
  D, Di, N, R = embed_dim, 2 * embed_dim, d_state, math.ceil(embed_dim / 16)
  layer = (L * D * 2 * Di + (L + 3) * Di * 4 + L * Di * (R + 2 * N) + L * R * Di
           + 2 * (5 * L * Di * N + 2 * L * Di) + L * Di * D + L * D)
  return depth * layer + L * 3 * patch * patch * D + D * 1000


@pytest.mark.parametrize("name, params, flops, target_params, target_gflops", [
    ("vim_tiny", 7_148_008, 1_819_227_648, 7e6, 1.5),
    ("vim_small", 25_796_584, 5_904_264_192, 26e6, 5.1),
])
def test_preset_counts(name, params, flops, target_params, target_gflops):
  model = abstract_vim(name)
  assert counting.count_params(model) == params
  assert counting.count_flops(model, 224) == flops
  assert abs(params / target_params - 1) <= 0.03
  # Our fvcore-style count (197 tokens, both directions' conv/x_proj/dt_proj, scan 9LDN + LD per
  # direction) is 21% / 16% above the published figures, which the LocalMamba hand count gives:
  assert abs(localmamba_flops(**PRESETS[name]) / (target_gflops * 1e9) - 1) <= 0.03
