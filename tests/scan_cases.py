"""Random inputs and error measures shared by the selective-scan tests."""
import jax
import jax.numpy as jnp
import numpy as np

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(seed, batch=2, length=64, d_inner=8, n_state=1, groups=1, dtype=jnp.float32,
                with_z=True, with_D=True, with_bias=True):
  """Fresh random inputs in the ranges mamba_ssm's own tests use. Returns a dict by ARG_NAMES."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  f32 = jnp.float32
  return dict(
      u=jax.random.normal(ks[0], (batch, length, d_inner), f32).astype(dtype),
      delta=(0.5 * jax.random.uniform(ks[1], (batch, length, d_inner), f32)).astype(dtype),
      A=-0.5 - jax.random.uniform(ks[2], (d_inner, n_state), f32),
      B=jax.random.normal(ks[3], (batch, length, groups, n_state), f32).astype(dtype),
      C=jax.random.normal(ks[4], (batch, length, groups, n_state), f32).astype(dtype),
      D=jax.random.normal(ks[5], (d_inner,), f32) if with_D else None,
      z=jax.random.normal(ks[6], (batch, length, d_inner), f32).astype(dtype) if with_z else None,
      delta_bias=0.5 * jax.random.uniform(ks[7], (d_inner,), f32) if with_bias else None,
  )


def rel_err(x, ref):
  """max |x - ref| / max |ref| in float64: the error relative to the tensor's scale (the plain
  max |x| where the reference is exactly zero, e.g. dA when L = 1)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  scale = np.max(np.abs(ref))
  return float(np.max(np.abs(x - ref)) / (scale if scale > 0 else 1.0))


def value_and_grads(fn, inputs, seed=123, **flags):
  """Runs fn(**inputs, **flags) -> (y, last) and the gradients of <y, gy> + <last, gl>
  for random cotangents gy, gl, with respect to every array input, all in one jit.
  Returns (y, last, grads dict)."""
  names = [k for k in ARG_NAMES if inputs.get(k) is not None]

  def forward(arrays):
    return fn(**{**inputs, **dict(zip(names, arrays))}, return_last_state=True, **flags)

  @jax.jit
  def run(arrays):
    (y, last), pullback = jax.vjp(forward, arrays)
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    gy = jax.random.normal(k1, y.shape, jnp.float32).astype(y.dtype)
    gl = jax.random.normal(k2, last.shape, jnp.float32)
    return y, last, pullback((gy, gl))[0]

  y, last, grads = run([inputs[k] for k in names])
  return y, last, dict(zip(names, grads))
