"""Plain-JAX oracles for the model paths: every route materialised (flipped copies included) and
scanned by the reference backend; Adaptor-T's reads as dense interpolation matrices."""
import jax
import jax.numpy as jnp

import kernels


def adaptor_read_matrix(move_LSK, c_LSK, length):
  """M[s, i, j]: the weight position i of group s gives to state j, reading causally (scan order)."""
  S = move_LSK.shape[1]
  window_S = length / 2.0 ** (S - 1 - jnp.arange(S))
  i_L = jnp.arange(length, dtype=jnp.float32)
  p = jnp.clip(i_L[:, None, None] - window_S[:, None] * move_LSK, 0, length - 1)
  p0 = jnp.floor(p)
  frac = p - p0
  j = jnp.arange(length)
  lo = (j == p0[..., None]).astype(jnp.float32)  # (L, S, K, L)
  hi = (j == jnp.minimum(p0 + 1, length - 1)[..., None]).astype(jnp.float32)
  taps = (1 - frac)[..., None] * lo + frac[..., None] * hi
  return jnp.einsum("lsk,lskj->slj", c_LSK, taps)


def adaptor_t(h_BLD, params, route, num_groups, num_points, learned=True):
  """One route's Adaptor-T in its scan order (the past is at lower indices)."""
  Bsz, L, D = h_BLD.shape
  S, K = num_groups, num_points
  if learned:
    o = (h_BLD @ params["phi_p"][route] + params["phi_p_bias"][route]).reshape(Bsz, L, S, K)
    c = jax.nn.softmax((h_BLD @ params["phi_c"][route] + params["phi_c_bias"][route])
                       .reshape(Bsz, L, S, K), -1)
    move = jax.nn.sigmoid(o)
  else:
    move = jnp.broadcast_to((jnp.arange(K) + 1.0) / K, (Bsz, L, S, K))
    c = jnp.full((Bsz, L, S, K), 1.0 / K)
  M_BSLL = jax.vmap(lambda m, cc: adaptor_read_matrix(m, cc, L))(move, c)
  h_BSLd = h_BLD.reshape(Bsz, L, S, D // S).transpose(0, 2, 1, 3)
  read = jnp.einsum("bslj,bsjd->bsld", M_BSLL, h_BSLd).transpose(0, 2, 1, 3).reshape(Bsz, L, D)
  return h_BLD + params["gamma"][route] * read


def ss2d(x_BHWC, p, adaptor=None, dilations=(1, 2, 3)):
  """SS2D from its parameters `p` (nnx.state(...) as a nested dict of arrays)."""
  u = x_BHWC @ p["in_proj"]["kernel"]
  Di = u.shape[-1]
  u = jax.lax.conv_general_dilated(u, p["conv2d"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=Di)
  u = jax.nn.silu(u)
  Bsz, H, W, _ = u.shape
  L = H * W
  rows = u.reshape(Bsz, L, Di)
  cols = u.transpose(0, 2, 1, 3).reshape(Bsz, L, Di)
  seqs = [rows, cols, rows[:, ::-1], cols[:, ::-1]]
  N = p["A_log"].shape[-1]
  R = p["dt_proj"].shape[1]
  y = 0.0
  for k, xk in enumerate(seqs):
    dbl = xk @ p["x_proj"][k]
    dt, Bk, Ck = dbl[..., :R], dbl[..., R:R + N], dbl[..., R + N:]
    delta = dt @ p["dt_proj"][k]
    A = -jnp.exp(p["A_log"][k])
    if adaptor is None:
      yk = kernels.selective_scan(xk, delta, A, Bk[:, :, None], Ck[:, :, None], p["D"][k],
                                  delta_bias=p["dt_bias"][k], delta_softplus=True,
                                  backend="reference")
    else:
      h = kernels.selective_scan(xk, delta, A, Bk[:, :, None], jnp.ones_like(Ck[:, :, None]),
                                 delta_bias=p["dt_bias"][k], delta_softplus=True,
                                 backend="reference")
      h = adaptor_t(h, p["adaptor_t"], k, **adaptor)
      yk = Ck * h + p["D"][k] * xk
    if k >= 2:
      yk = yk[:, ::-1]
    if k % 2 == 0:
      y = y + yk.reshape(Bsz, H, W, Di)
    else:
      y = y + yk.reshape(Bsz, W, H, Di).transpose(0, 2, 1, 3)
  if adaptor is not None:
    y = y + sum(
        jax.lax.conv_general_dilated(y, p["adaptor_s"]["convs"][i]["kernel"], (1, 1),
                                     ((d, d), (d, d)), rhs_dilation=(d, d),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=Di) + p["adaptor_s"]["convs"][i]["bias"]
        for i, d in enumerate(dilations))
  norm = p["out_norm"]
  mean = y.mean(-1, keepdims=True)
  var = ((y - mean) ** 2).mean(-1, keepdims=True)
  y = (y - mean) / jnp.sqrt(var + 1e-5) * norm["scale"] + norm["bias"]
  return y @ p["out_proj"]["kernel"]

