"""`learned_read`: Adaptor-T's read at the locations and weights its own linear map phi gives
(DESIGN.md §3), as one op: phi's product, the locations and the read, and their backward.

  out = learned_read(h, w, b, reach, gamma=None, scale=None, backend="auto")
  h: (batch, L, G, C), its G heads in R routes of S heads each (G = R S, R = w.shape[0])
  w: (R, S C, 2 K S), b: (R, 2 K S): route r's phi, from the S C channels of its heads at a
     position to 2 K S logits ordered (location or weight, point, head of the route)
  reach: (G,) float32, how far each head looks (negative: towards smaller positions)
  logits[b, j, k, r S + s, i] = <h[b, i, route r], w[r, :, (j K + k) S + s]> + b[r, (j K + k) S + s]
  pos = clip(i + reach * sigmoid(logits[:, 0]), 0, L - 1);  weight = softmax over k of logits[:, 1]
  out = memory_read(h, pos, weight, gamma, scale)   (kernels/read.py: its contract, its dtypes)
Gradients: h (through the read and through phi), w, b, gamma and scale; none for reach.

Backends, each with the signature (h, w, b, reach, gamma, scale) -> out:
  reference   phi as an einsum, then read.reference, autodiff throughout;
  xla         phi as `route_linear` (its own backward, see there), its product checkpoint-named
              PHI for a rematerialisation policy, then memory_read's xla path (the GPU
              default);
  cpu         the same phi, then memory_read's XLA:CPU kernels (read_cpu.cc; the CPU default);
  pallas_tpu  read_pallas_tpu.learned: phi's product is taken inside the read's kernels, from
              the rows of h they hold in VMEM, and phi's backward inside the read's backward
              kernel, so that neither the logits, nor the locations, nor their gradients reach
              HBM (what that saves: benchmarks/README.md, adaptor_block.py).
"auto" picks pallas_tpu on TPU (xla for an image too large for its VMEM), cpu on the CPU and xla
elsewhere ($ADAPTOR_READ_BACKEND overrides it, as for memory_read). Under a mesh the call runs once per shard of the batch (per_shard.py).
"""
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from kernels import read
from kernels.common import F32
from kernels.per_shard import per_shard

PHI = "adaptor_phi"  # the xla path's phi product, by this name for a rematerialisation policy


def learned_read(h, w, b, reach, gamma=None, scale=None, backend="auto"):
  """memory_read at the locations and weights phi gives from h; see the module docstring.
  backend: "auto", one of BACKENDS, or a function with their signature."""
  _check(h, w, b, reach)
  read.check(h, None, None, gamma, scale, "learned_read")
  call = read.resolve(backend, BACKENDS, "learned_read")
  return per_shard(call, (h, w, b, reach.astype(F32), gamma, scale),
                   batched=(True, False, False, False, False, True), name="learned_read")


def _check(h, w, b, reach):
  def fail(msg):
    raise ValueError(f"learned_read: {msg}")

  if h.ndim != 4:
    fail(f"h must be (batch, L, G, C), got shape {h.shape}")
  _, _, G, C = h.shape
  if w.ndim != 3 or not w.shape[0] or G % w.shape[0] or w.shape[1] != G // w.shape[0] * C:
    fail(f"w must be (R, S C, 2 K S) with G = R S heads of C = {C} channels (G = {G}), got "
         f"{w.shape}")
  S = G // w.shape[0]
  if w.shape[2] % (2 * S) or not w.shape[2]:
    fail(f"w's last axis must be 2 K S with S = {S} heads per route, got {w.shape[2]}")
  if b.shape != (w.shape[0], w.shape[2]):
    fail(f"b must be (R, 2 K S) = {(w.shape[0], w.shape[2])}, got {b.shape}")
  if reach.shape != (G,):
    fail(f"reach must be (G,) = ({G},), got {reach.shape}")
  for name, x in (("w", w), ("b", b), ("reach", reach)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      fail(f"{name} must be floating point, got {x.dtype}")


def locations(logits_BRJL, reach, heads):
  """phi's logits (batch, R, 2 K S, L), route-major as route_linear gives them -> pos and
  weight (batch, K, G, L)."""
  batch, R, J, L = logits_BRJL.shape
  S = heads // R
  K = J // (2 * S)
  out = logits_BRJL.reshape(batch, R, 2, K, S, L).transpose(0, 2, 3, 1, 4, 5).reshape(
      batch, 2, K, heads, L)
  move = jax.nn.sigmoid(out[:, 0])
  pos = jnp.clip(jnp.arange(L, dtype=F32) + reach[:, None] * move, 0.0, L - 1)
  return pos, jax.nn.softmax(out[:, 1], axis=1)


# ---------------------------------------------------------------------------------------------
# Backends.

def reference(h, w, b, reach, gamma=None, scale=None):
  batch, L, G, C = h.shape
  R = w.shape[0]
  logits = jnp.einsum("blrd,rdj->brjl", h.reshape(batch, L, R, -1).astype(F32), w.astype(F32))
  pos, weight = locations(logits + b.astype(F32)[:, :, None], reach, G)
  return read.reference(h, pos, weight, gamma, scale)


def xla(h, w, b, reach, gamma=None, scale=None):
  return read.BACKENDS["xla"](h, *_xla_phi(h, w, b, reach), gamma, scale)


def cpu(h, w, b, reach, gamma=None, scale=None):
  """XLA's phi as in `xla`, then memory_read's XLA:CPU kernels."""
  return read.BACKENDS["cpu"](h, *_xla_phi(h, w, b, reach), gamma, scale)


def _xla_phi(h, w, b, reach):
  """(pos, weight) from phi's product by XLA (route_linear, checkpoint-named PHI)."""
  batch, L, G, C = h.shape
  logits = checkpoint_name(route_linear(h.reshape(batch, L, G * C), w.astype(h.dtype)), PHI)
  return locations(logits + b.astype(F32)[:, :, None], reach, G)


def pallas_tpu(h, w, b, reach, gamma=None, scale=None, **kwargs):
  """The Mosaic kernels (read_pallas_tpu.learned; kwargs: interpret, block_sizes)."""
  from kernels import read_pallas_tpu  # noqa: PLC0415 - Mosaic, only for TPU
  return read_pallas_tpu.learned(h, w, b, reach, gamma, scale, **kwargs)


BACKENDS = {"reference": reference, "xla": xla, "cpu": cpu, "pallas_tpu": pallas_tpu}


@jax.custom_vjp
def route_linear(x_BLE, w_RDC):
  """Each route's own linear map of its states, positions last: out[b, r, c, l] =
  sum_d x[b, l, r * D + d] w[r, d, c], in float32 (bf16 logits round the locations enough to
  move the read by 1-3e-2 relative; XLA:CPU has no bf16 x bf16 -> float32 product). The
  backward takes each route's dx as its own product, side by side in the lanes as x is (as one
  product, XLA:TPU lays dx out routes-first and copies it). Each route's d w is its own product
  too, except on the CPU, where they are a loop over the routes: XLA:CPU would merge the
  routes-first layout of x for the static products with the forward's and keep it until the
  backward. Elsewhere static products, so that XLA's cost analysis sees them all (it counts a
  loop's body once). What each choice measured: benchmarks/README.md, Design measurements."""
  return jnp.einsum("blrd,rdc->brcl", _by_route(x_BLE, w_RDC).astype(F32), w_RDC.astype(F32))


def _by_route(x_BLE, w_RDC):
  B, L, _ = x_BLE.shape
  return x_BLE.reshape(B, L, w_RDC.shape[0], w_RDC.shape[1])


def _route_linear_fwd(x_BLE, w_RDC):
  return route_linear(x_BLE, w_RDC), (x_BLE, w_RDC)


def _route_linear_bwd(res, g_BRCL):
  x_BLE, w_RDC = res
  R, D, _ = w_RDC.shape

  def route(r):  # the CPU's loop slices x as it is kept
    x_BLD = jax.lax.dynamic_slice_in_dim(x_BLE, r * D, D, axis=2)
    return jnp.einsum("bld,bcl->dc", x_BLD, g_BRCL[:, r])

  dx = jnp.concatenate([g_BRCL[:, r].mT @ w_RDC[r].T for r in range(R)], axis=-1)
  dw = jax.lax.platform_dependent(
      cpu=lambda: jax.lax.map(route, jnp.arange(R)),
      default=lambda: jnp.stack([route(r) for r in range(R)]))
  return dx.astype(x_BLE.dtype), dw.astype(w_RDC.dtype)


route_linear.defvjp(_route_linear_fwd, _route_linear_bwd)
