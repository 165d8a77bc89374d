"""models/fpn.py against a NumPy oracle of mmdetection's FPN (laterals, nearest top-down path,
3x3 outputs, the max-pooled extra level), on fresh random inputs and weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adaptor_jax.models import fpn


def nearest_np(x_HWC, size):
  """torch's legacy nearest: out[i] = in[min(floor(i * in / out), in - 1)]."""
  rows = [min(int(np.floor(i * (x_HWC.shape[0] / size[0]))), x_HWC.shape[0] - 1)
          for i in range(size[0])]
  cols = [min(int(np.floor(j * (x_HWC.shape[1] / size[1]))), x_HWC.shape[1] - 1)
          for j in range(size[1])]
  return x_HWC[rows][:, cols]


def conv_np(x_HWC, kernel_KKIO, bias_O):
  """Stride-1 convolution with zero padding kernel // 2, by kernel offsets."""
  k = kernel_KKIO.shape[0]
  p = k // 2
  xp = np.pad(x_HWC, [(p, p), (p, p), (0, 0)])
  H, W = x_HWC.shape[:2]
  out = np.zeros((H, W, kernel_KKIO.shape[3])) + bias_O
  for dy in range(k):
    for dx in range(k):
      out += xp[dy:dy + H, dx:dx + W] @ kernel_KKIO[dy, dx]
  return out


def fpn_np(model, features):
  params = lambda conv: (np.asarray(conv.kernel[...], np.float64),
                         np.asarray(conv.bias[...], np.float64))
  laterals = [conv_np(f, *params(c)) for c, f in zip(model.lateral_convs, features)]
  for i in range(len(laterals) - 1, 0, -1):
    laterals[i - 1] = laterals[i - 1] + nearest_np(laterals[i], laterals[i - 1].shape[:2])
  outs = [conv_np(lat, *params(c)) for c, lat in zip(model.fpn_convs, laterals)]
  while len(outs) < model.num_outs:
    outs.append(outs[-1][::2, ::2])
  return outs


@pytest.mark.parametrize("sizes", [((16, 24), (8, 12), (4, 6), (2, 3)),
                                   ((15, 9), (8, 5), (4, 3), (2, 2))], ids=["halves", "odd"])
def test_matches_the_oracle(sizes):
  dims = (6, 10, 12, 16)
  model = fpn.FPN(dims, channels=8, num_outs=5, rngs=nnx.Rngs(len(sizes[0])))
  keys = jax.random.split(jax.random.PRNGKey(sum(sizes[0])), len(dims))
  features = [jax.random.normal(k, (2, *s, d)) for k, s, d in zip(keys, sizes, dims)]
  outs = jax.jit(lambda f: model(f))(features)
  assert [o.shape for o in outs] == [(2, *s, 8) for s in sizes] + [
      (2, -(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2), 8)]
  for b in range(2):
    want = fpn_np(model, [np.asarray(f[b], np.float64) for f in features])
    for level, (got, ref) in enumerate(zip(outs, want)):
      np.testing.assert_allclose(np.asarray(got[b]), ref, rtol=1e-5, atol=1e-5,
                                 err_msg=f"level {level}")


def test_upsample_nearest_is_torchs_legacy_nearest():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 7, 3))
  for size in [(10, 14), (7, 9), (3, 4), (5, 7)]:
    np.testing.assert_array_equal(np.asarray(fpn.upsample_nearest(x, size))[0],
                                  nearest_np(np.asarray(x[0]), size))


def test_too_few_outputs_is_refused():
  with pytest.raises(ValueError, match="num_outs=3 must be at least the 4 input stages"):
    fpn.FPN((4, 4, 4, 4), num_outs=3, rngs=nnx.Rngs(0))
