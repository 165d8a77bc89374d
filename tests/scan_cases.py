"""Random inputs, error measures and the oracle comparison shared by the selective-scan tests."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

import kernels

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
FWD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
GRAD_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}

# Model shapes the kernels must lower at, (batch, L, D, G, N): the VMamba-T stages (the 4 scan
# routes are the groups, N = 1) and Vim-T.
MODEL_SHAPES = {
    "vmamba_t_stage1": (8, 3136, 384, 4, 1),
    "vmamba_t_stage2": (8, 784, 768, 4, 1),
    "vmamba_t_stage3": (8, 196, 1536, 4, 1),
    "vmamba_t_stage4": (8, 49, 3072, 4, 1),
    "vim_t": (8, 197, 384, 1, 16),
}


@functools.partial(jax.jit, static_argnums=range(1, 10))
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


def export_args(shape, dtype):
  """ShapeDtypeStructs of the backends' positional arguments (with z) at a MODEL_SHAPES entry."""
  batch, length, d_inner, groups, n_state = shape
  S, f32 = jax.ShapeDtypeStruct, jnp.float32
  act, bc = S((batch, length, d_inner), dtype), S((batch, length, groups, n_state), dtype)
  return (act, act, S((d_inner, n_state), f32), bc, bc, S((d_inner,), f32), act,
          S((d_inner,), f32))


def largest_tensor(mlir_text):
  """The element count of the largest tensor type in an exported module's text."""
  sizes = [np.prod([int(d) for d in dims.split("x")[:-1]], dtype=np.int64)
           for dims in re.findall(r"tensor<((?:\d+x)+)\w+>", mlir_text)]
  return int(max(sizes))


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


def errors_against_reference(backend, inputs, **flags):
  """{"y", "last", "d<arg>"...}: rel_err of `backend`'s y, last state and every gradient
  against the reference's on `inputs` (shapes and dtypes checked)."""
  dtype = inputs["u"].dtype.type
  y, last, grads = value_and_grads(
      functools.partial(kernels.selective_scan, backend=backend), inputs, **flags)
  y_r, last_r, grads_r = value_and_grads(
      functools.partial(kernels.selective_scan, backend="reference"), inputs, **flags)
  assert y.shape == inputs["u"].shape and y.dtype == dtype
  assert last.shape == last_r.shape and last.dtype == jnp.float32
  for k, g in grads.items():
    assert g.shape == inputs[k].shape and g.dtype == grads_r[k].dtype, k
  errs = {"y": rel_err(y, y_r), "last": rel_err(last, last_r)}
  errs.update({f"d{k}": rel_err(grads[k], grads_r[k]) for k in grads_r})
  return errs, y


def within_tolerance(errs, dtype):
  return (errs["y"] <= FWD_TOL[dtype] and errs["last"] <= FWD_TOL[dtype]
          and all(v <= GRAD_TOL[dtype] for k, v in errs.items() if k.startswith("d")))


def check_against_reference(backend, inputs, name="", **flags):
  """Asserts that `backend` (a name or a backend function) gives the reference's y, last state
  and every gradient within FWD_TOL / GRAD_TOL of the inputs' dtype; prints the errors."""
  errs, y = errors_against_reference(backend, inputs, **flags)
  print(f"\n{name} {flags}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
  assert within_tolerance(errs, inputs["u"].dtype.type), errs
  return y


def check_unit_readout(backend, seed=3, reverse=False):
  """Adaptor-T's use of the op (DESIGN.md §3): with C = 1, D = None and N = 1 it returns the
  hidden states h themselves. Compares with a float64 NumPy loop, then checks the gradients."""
  batch, length, d_inner, groups = 2, 33, 8, 4
  inputs = make_inputs(seed, batch, length, d_inner, 1, groups, with_z=False, with_D=False)
  inputs["C"] = jnp.ones_like(inputs["C"])
  y = kernels.selective_scan(**inputs, delta_softplus=True, reverse=reverse, backend=backend)
  u, delta, A, B = (np.asarray(inputs[k], np.float64) for k in ("u", "delta", "A", "B"))
  delta = np.log1p(np.exp(delta + np.asarray(inputs["delta_bias"])))
  B = np.repeat(B[..., 0], d_inner // groups, axis=2)
  h, want = np.zeros((batch, d_inner)), np.zeros_like(u)
  for t in (range(length - 1, -1, -1) if reverse else range(length)):
    h = np.exp(delta[:, t] * A[:, 0]) * h + delta[:, t] * B[:, t] * u[:, t]
    want[:, t] = h
  err = rel_err(y, want)
  print(f"\nunit read-out reverse={reverse}: states {err:.1e}")
  assert err <= FWD_TOL[jnp.float32]
  check_against_reference(backend, inputs, "unit read-out", delta_softplus=True, reverse=reverse)
