"""UperNet (adaptor_jax/models/upernet.py) and the ops it adds to common.py, against NumPy
oracles written from PyTorch's and mmsegmentation's definitions: adaptive average pooling's
bins, bilinear resizing with align_corners=False, BatchNorm in training and eval, UPerHead and
FCNHead as a whole; the presets' counts against VMamba's UperNet table."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaptor_jax.models import common, counting, registry, upernet


def _rng(seed):
  return np.random.default_rng(seed)


def np_adaptive_avg_pool(x, bins):
  """PyTorch's AdaptiveAvgPool2d on NHWC: bin i covers [floor(i n / b), ceil((i + 1) n / b))."""
  B, H, W, C = x.shape
  out = np.zeros((B, bins, bins, C))
  for i in range(bins):
    for j in range(bins):
      h0, h1 = math.floor(i * H / bins), math.ceil((i + 1) * H / bins)
      w0, w1 = math.floor(j * W / bins), math.ceil((j + 1) * W / bins)
      out[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
  return out


def _taps(n_in, n_out):
  """PyTorch's bilinear source taps along one axis (align_corners=False): (i0, i1, w1)."""
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
  return i0, np.minimum(i0 + 1, n_in - 1), src - i0


def np_resize_bilinear(x, size):
  """F.interpolate(x, size, mode="bilinear", align_corners=False) on NHWC."""
  h0, h1, wh = _taps(x.shape[1], size[0])
  v0, v1, wv = _taps(x.shape[2], size[1])
  rows = x[:, h0] * (1 - wh)[None, :, None, None] + x[:, h1] * wh[None, :, None, None]
  return rows[:, :, v0] * (1 - wv)[None, None, :, None] + rows[:, :, v1] * wv[None, None, :, None]


@pytest.mark.parametrize("shape,bins", [((2, 7, 5, 3), 6), ((1, 16, 16, 2), 3), ((1, 4, 9, 2), 1),
                                        ((1, 5, 5, 1), 2)])
def test_adaptive_avg_pool_is_pytorchs(shape, bins):
  x = _rng(0).normal(size=shape).astype(np.float32)
  got = np.asarray(common.adaptive_avg_pool(jnp.asarray(x), bins))
  np.testing.assert_allclose(got, np_adaptive_avg_pool(x, bins), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,size", [((2, 4, 6, 3), (16, 24)), ((1, 3, 5, 2), (7, 11)),
                                        ((1, 16, 20, 2), (5, 7)), ((1, 6, 6, 1), (6, 6))])
def test_bilinear_resize_is_pytorchs(shape, size):
  """Up, down and by odd factors: half-pixel centres, clamped at the edges, no antialiasing."""
  x = _rng(1).normal(size=shape).astype(np.float32)
  got = np.asarray(common.resize_bilinear(jnp.asarray(x), size))
  np.testing.assert_allclose(got, np_resize_bilinear(x, size), rtol=1e-5, atol=1e-6)


def test_batch_norm_trains_on_the_batch_and_evaluates_on_running_statistics():
  x = _rng(2).normal(2.0, 3.0, size=(4, 5, 6, 3)).astype(np.float32)
  bn = common.BatchNorm(3)
  bn.scale[...] = jnp.asarray([1.0, 2.0, 0.5])
  bn.bias[...] = jnp.asarray([0.0, -1.0, 3.0])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  want = (x - mean) / np.sqrt(var + 1e-5) * [1.0, 2.0, 0.5] + [0.0, -1.0, 3.0]
  np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
  n = 4 * 5 * 6  # running statistics: momentum 0.1, the unbiased variance (PyTorch's)
  np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  bn.use_running_average = True
  running = (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var * n / (n - 1) + 1e-5)
  np.testing.assert_allclose(np.asarray(bn(jnp.asarray(x))),
                             running * [1.0, 2.0, 0.5] + [0.0, -1.0, 3.0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The heads against NumPy (eval mode: BatchNorm on running statistics, dropout off).


def np_conv(x, kernel, bias=None):
  """A stride-1 'same' convolution, NHWC, kernel (kh, kw, cin, cout)."""
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, [(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)])
  H, W = x.shape[1:3]
  out = sum(np.einsum("bhwc,cd->bhwd", xp[:, i:i + H, j:j + W], kernel[i, j])
            for i in range(kh) for j in range(kw))
  return out if bias is None else out + bias


def np_conv_module(m, x):
  bn = m.bn
  y = np_conv(x, np.asarray(m.conv.kernel[...]))
  y = (y - np.asarray(bn.mean[...])) / np.sqrt(np.asarray(bn.var[...]) + 1e-5)
  return np.maximum(y * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...]), 0.0)


def np_classifier(conv, x):
  return np_conv(x, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...]))


def np_uper_head(head, features):
  """mmseg's UPerHead.forward (channels last), from its definition."""
  last = features[-1]
  psp = [last] + [np_resize_bilinear(np_conv_module(m, np_adaptive_avg_pool(last, s)),
                                     last.shape[1:3])
                  for m, s in zip(head.psp_modules, upernet.POOL_SCALES)]
  laterals = [np_conv_module(m, f) for m, f in zip(head.lateral_convs, features[:-1])]
  laterals.append(np_conv_module(head.bottleneck, np.concatenate(psp, -1)))
  for i in range(len(laterals) - 1, 0, -1):
    laterals[i - 1] = laterals[i - 1] + np_resize_bilinear(laterals[i], laterals[i - 1].shape[1:3])
  outs = [np_conv_module(m, lat) for m, lat in zip(head.fpn_convs, laterals[:-1])]
  outs.append(laterals[-1])
  outs = [outs[0]] + [np_resize_bilinear(o, outs[0].shape[1:3]) for o in outs[1:]]
  return np_classifier(head.conv_seg, np_conv_module(head.fpn_bottleneck, np.concatenate(outs, -1)))


def _randomize_statistics(module, seed):
  """Running statistics as a trained model has them (not 0 and 1)."""
  rng = _rng(seed)
  for _, bn in nnx.iter_modules(module):
    if isinstance(bn, common.BatchNorm):
      bn.mean[...] = jnp.asarray(rng.normal(size=bn.mean.shape), jnp.float32)
      bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=bn.var.shape), jnp.float32)
      bn.bias[...] = jnp.asarray(rng.normal(size=bn.bias.shape), jnp.float32)


def test_heads_match_mmsegs_definitions():
  """UPerHead on four stages of odd sizes (the pools' bins overlap) and FCNHead, eval mode."""
  dims, rngs = (8, 16, 24, 32), nnx.Rngs(0)
  head = upernet.UPerHead(dims, 16, 5, dropout=0.1, dtype=jnp.float32, rngs=rngs)
  aux = upernet.FCNHead(24, 12, 5, dropout=0.1, dtype=jnp.float32, rngs=rngs)
  for i, m in enumerate((head, aux)):
    _randomize_statistics(m, 10 + i)
    m.eval()
  rng = _rng(3)
  features = [rng.normal(size=(2, h, w, d)).astype(np.float32)
              for (h, w), d in zip(((22, 26), (11, 13), (6, 7), (3, 4)), dims)]
  got = np.asarray(head([jnp.asarray(f) for f in features]))
  want = np_uper_head(head, features)
  assert got.shape == (2, 22, 26, 5)
  assert _rel(got, want) < 1e-5, _rel(got, want)
  got = np.asarray(aux(jnp.asarray(features[2])))
  want = np_classifier(aux.conv_seg, np_conv_module(aux.convs[0], features[2]))
  assert _rel(got, want) < 1e-5, _rel(got, want)


def _rel(got, want):
  """||got - want|| / ||want|| in float64."""
  return float(np.linalg.norm(np.float64(got) - want) / np.linalg.norm(want))


def test_upernet_outputs_and_gradients():
  """Training: (logits at 1/4, aux logits at 1/16), every param gets a gradient; eval: the
  logits alone."""
  model = registry.create_model("upernet_b1", num_classes=7, rngs=nnx.Rngs(0),
                                dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), channels=16,
                                aux_channels=8, scan_backend="xla")
  x = jnp.asarray(_rng(4).normal(size=(2, 64, 96, 3)), jnp.float32)

  def loss(m):
    main, side = m(x)
    return jnp.mean(main ** 2) + 0.4 * jnp.mean(side ** 2), (main, side)
  (_, (logits, aux)), grads = nnx.jit(
      lambda m: nnx.value_and_grad(loss, has_aux=True)(m))(model)  # one compile, not op by op
  assert logits.shape == (2, 16, 24, 7) and aux.shape == (2, 4, 6, 7)
  norms = {"/".join(map(str, p)): float(jnp.linalg.norm(g)) for p, g in
           nnx.to_flat_state(grads)}
  assert all(np.isfinite(v) for v in norms.values())
  assert norms["decode_head/conv_seg/kernel"] > 0 and norms["auxiliary_head/conv_seg/kernel"] > 0
  assert norms["backbone/patch_embed/conv1/kernel"] > 0
  model.eval()
  out = jax.eval_shape(lambda: model(x))
  assert isinstance(out, jax.ShapeDtypeStruct) and out.shape == (2, 16, 24, 7)


@pytest.mark.parametrize("name,params,gflops,target", [
    ("upernet_vmamba_tiny", 61_902_572, 948.780, (62e6, 949)),  # VMamba's UperNet table
    ("upernet_b2", 63_667_116, 958.368, None),
])
def test_counts_at_512x2048(name, params, gflops, target):
  model = nnx.eval_shape(lambda: registry.create_model(name, num_classes=150,
                                                       rngs=nnx.Rngs(0)))
  got = counting.count_params(model), round(counting.count_flops(model, (512, 2048)) / 1e9, 3)
  assert got == (params, gflops)
  if target:
    assert abs(params / target[0] - 1) <= 0.01 and abs(gflops / target[1] - 1) <= 0.03
