"""`selective_scan`: the public op, its argument checks and the choice of backend.

Every backend module exposes the same function,
  selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
    -> (y (batch, L, D) in u.dtype, last state (batch, D, N) float32)
with D and delta_bias already filled in (zeros when the caller gave None) and its own custom_vjp.
"""
import jax.numpy as jnp

from kernels import pallas_gpu, pallas_tpu, reference, xla
from kernels.common import resolve
from kernels.per_shard import per_shard

BACKENDS = {
    "reference": reference.selective_scan,
    "xla": xla.selective_scan,
    "pallas_tpu": pallas_tpu.selective_scan,
    "pallas_gpu": pallas_gpu.selective_scan,
}
ENV_VAR = "ADAPTOR_SCAN_BACKEND"  # overrides backend="auto" for every call in the process
AUTO = {"tpu": "pallas_tpu", "cuda": "pallas_gpu", "default": "xla"}  # backend="auto"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, reverse=False, backend="auto"):
  """Selective scan (Mamba's S6) over axis 1 of channel-last inputs.

  u, delta: (batch, L, D); A: (D, N); B, C: (batch, L, G, N), channel d uses group d // (D // G);
  D, delta_bias: (D,) or None; z: (batch, L, D) or None (the output is gated by silu(z)).
    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t;   y_t = <h_t, C_t> + D u_t
  reverse=True runs t = L-1 .. 0. Accumulation is float32; y has u's dtype.
  backend: "auto" (per platform inside one jitted function: pallas_tpu on TPU, pallas_gpu on
  CUDA, xla elsewhere; $ADAPTOR_SCAN_BACKEND overrides it), one of BACKENDS, or a function
  with the backends' signature (the tests pass interpret-mode Pallas kernels this way).
  Returns y, or (y, last state (batch, D, N) float32) when return_last_state.
  Under a mesh in context (jax.set_mesh) the call runs once per shard of the batch, over the
  mesh's axes (kernels/per_shard.py): no kernel is ever left to XLA's partitioner.
  """
  _check(u, delta, A, B, C, D, z, delta_bias)
  d_inner = u.shape[-1]
  D = jnp.zeros((d_inner,), jnp.float32) if D is None else D.astype(jnp.float32)
  delta_bias = (jnp.zeros((d_inner,), jnp.float32) if delta_bias is None
                else delta_bias.astype(jnp.float32))
  args = (u, delta, A.astype(jnp.float32), B, C, D, z, delta_bias)
  flags = (bool(delta_softplus), bool(return_last_state), bool(reverse))

  bind = lambda fn: (lambda *a: fn(*a, *flags))
  call = resolve("selective_scan", bind(backend) if callable(backend) else backend,
                 {name: bind(fn) for name, fn in BACKENDS.items()}, ENV_VAR, AUTO)
  # On a mesh, each device scans its own slice of the batch (kernels/per_shard.py).
  y, last = per_shard(call, args, batched=(True, True, False, True, True, False, True, False),
                      name="selective_scan")
  return (y, last) if return_last_state else y


def _check(u, delta, A, B, C, D, z, delta_bias):
  """Raises ValueError naming the argument whose shape or dtype breaks DESIGN.md §2."""
  def fail(msg):
    raise ValueError(f"selective_scan: {msg}")

  if u.ndim != 3:
    fail(f"u must be (batch, L, D), got shape {u.shape}")
  batch, length, d_inner = u.shape
  if length == 0:
    fail("u has length L = 0")
  if delta.shape != u.shape:
    fail(f"delta must have u's shape {u.shape}, got {delta.shape}")
  if A.ndim != 2 or A.shape[0] != d_inner:
    fail(f"A must be (D, N) = ({d_inner}, N), got {A.shape}")
  n_state = A.shape[1]
  for name, x in (("B", B), ("C", C)):
    if x.ndim != 4 or x.shape[:2] != (batch, length) or x.shape[3] != n_state:
      fail(f"{name} must be (batch, L, G, N) = ({batch}, {length}, G, {n_state}), got {x.shape}")
  groups = B.shape[2]
  if C.shape[2] != groups:
    fail(f"B and C must have the same number of groups, got {groups} and {C.shape[2]}")
  if d_inner % groups:
    fail(f"D = {d_inner} channels do not split into G = {groups} groups")
  for name, x in (("D", D), ("delta_bias", delta_bias)):
    if x is not None and x.shape != (d_inner,):
      fail(f"{name} must be ({d_inner},), got {x.shape}")
  if z is not None and z.shape != u.shape:
    fail(f"z must have u's shape {u.shape}, got {z.shape}")
  for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("z", z)):
    if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
      fail(f"{name} must be floating point, got {x.dtype}")
