"""The oracle: selective scan as a plain `lax.scan` over time, float32 (or wider) throughout.

Exactly mamba_ssm's `selective_scan_ref` in a channel-last layout (DESIGN.md §2). It keeps one
(batch, D, N) state and lets autodiff differentiate the scan, so it is slow and stores a state per
step for the backward pass: it exists to be obviously right, and every other backend is tested
against it.
"""
import jax
import jax.numpy as jnp


def expand_groups(x_BLGN, d_inner):
  """(batch, L, G, N) -> (batch, L, D, N): channel d reads group d // (D // G)."""
  groups = x_BLGN.shape[2]
  return jnp.repeat(x_BLGN, d_inner // groups, axis=2)


def selective_scan(u_BLD, delta_BLD, A_DN, B_BLGN, C_BLGN, D_D, z_BLD, delta_bias_D,
                   delta_softplus, return_last_state, reverse):
  """Returns (y_BLD in u's dtype, last state (batch, D, N) float32; float64 for float64 inputs,
  so that finite differences can check the oracle itself)."""
  del return_last_state  # the caller drops the state when it is not asked for
  f32 = jnp.promote_types(u_BLD.dtype, jnp.float32)
  d_inner = u_BLD.shape[-1]
  u = u_BLD.astype(f32)
  delta = delta_BLD.astype(f32) + delta_bias_D.astype(f32)
  if delta_softplus:
    delta = jax.nn.softplus(delta)
  B = expand_groups(B_BLGN.astype(f32), d_inner)
  C = expand_groups(C_BLGN.astype(f32), d_inner)
  A = A_DN.astype(f32)

  def step(h_BDN, xs):
    u_BD, delta_BD, B_BDN, C_BDN = xs
    h_BDN = jnp.exp(delta_BD[..., None] * A) * h_BDN + (delta_BD * u_BD)[..., None] * B_BDN
    return h_BDN, jnp.einsum("bdn,bdn->bd", h_BDN, C_BDN)

  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  h0 = jnp.zeros((u.shape[0], d_inner, A.shape[-1]), f32)
  last_BDN, y_LBD = jax.lax.scan(step, h0, tuple(map(time_major, (u, delta, B, C))),
                                 reverse=reverse)
  y = jnp.moveaxis(y_LBD, 0, 1) + u * D_D.astype(f32)
  if z_BLD is not None:
    y = y * jax.nn.silu(z_BLD.astype(f32))
  return y.astype(u_BLD.dtype), last_BDN
