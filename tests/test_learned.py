"""kernels.learned_read (phi's product, the locations and the read as one op) against its
reference, every backend, forward and every gradient (h through the read and through phi, w, b,
gamma, scale) on fresh random inputs. The Pallas TPU kernels, which take phi's product and its
backward inside the read's kernels, run in interpret mode with NaN-filled out-of-bounds reads
(and the race detector on the ragged case) and compile for a TPU chip through the deviceless
AOT compiler at the model shapes."""
import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import deviceless, learned, read_pallas_tpu
from scan_cases import rel_err
from test_read import BF16_TOL, FWD_TOL, GRAD_TOL, INTERPRET, MODEL_SHAPES

NAMES = ("out", "dh", "dw", "db", "dgamma", "dscale")
ROUTE_SIGNS = (-1.0, -1.0, 1.0, 1.0)  # Adaptor-T's routes: two look back, two ahead


def make_inputs(seed, batch=1, length=37, routes=4, heads=2, channels=8, points=2,
                dtype=jnp.float32, gamma=True, scale=True):
  """h (batch, L, G, C) with G = routes x heads; w, b as Adaptor-T's phi (large enough that
  the locations spread over the window and many clip); reach as Adaptor-T's (a route's heads
  look L / 2^(S-1-s) back or ahead); gamma and scale when asked for."""
  k_h, k_w, k_b, k_g, k_s = jax.random.split(jax.random.PRNGKey(seed), 5)
  G, J = routes * heads, 2 * points * heads
  h = jax.random.normal(k_h, (batch, length, G, channels)).astype(dtype)
  w = 0.3 * jax.random.normal(k_w, (routes, heads * channels, J))
  b = jax.random.normal(k_b, (routes, J))
  window = length / 2.0 ** (heads - 1 - jnp.arange(heads))
  reach = (jnp.array(ROUTE_SIGNS[:routes])[:, None] * window).reshape(G)
  return (h, w, b, reach, jax.random.normal(k_g, (G, channels)) if gamma else None,
          jax.random.normal(k_s, (batch, G, length)) if scale else None)


def value_and_grads(fn, args, seed=9):
  """fn(*args) and its vjp of a random cotangent for every argument but reach."""
  diff = [i for i, a in enumerate(args) if a is not None and i != 3]

  def f(*xs):
    full = list(args)
    for i, x in zip(diff, xs):
      full[i] = x
    return fn(*full)

  out, vjp = jax.vjp(f, *(args[i] for i in diff))
  ct = jax.random.normal(jax.random.PRNGKey(seed), out.shape).astype(out.dtype)
  return out, dict(zip((NAMES[1 + i - (i > 3)] for i in diff), vjp(ct)))


def assert_close(fn, oracle, args, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL, label=""):
  got = jax.jit(functools.partial(value_and_grads, fn))(args)
  want = jax.jit(functools.partial(value_and_grads, oracle))(args)
  errors = {"out": rel_err(got[0], want[0])}
  errors.update({name: rel_err(got[1][name], want[1][name]) for name in want[1]})
  print(f"\n{label}: rel errors {dict((k, '%.1e' % e) for k, e in errors.items())}")
  for name, err in errors.items():
    tol = fwd_tol if name == "out" else grad_tol
    assert err <= tol, f"{label}: {name} rel error {err:.2e} > {tol}"


def pallas_interpret(block_l=128, interpret=pltpu.InterpretParams(
    out_of_bounds_reads="uninitialized")):
  return functools.partial(learned.pallas_tpu, interpret=interpret,
                           block_sizes=read_pallas_tpu.BlockSizes(block_l))


BACKENDS = {"xla": learned.xla, "cpu": learned.cpu, "pallas_tpu": pallas_interpret()}
CASES = {  # name: make_inputs kwargs
    "L37_S2_K2": dict(batch=2),
    "L136_ragged_S1_K1": dict(length=136, routes=2, heads=1, points=1),  # chunks of 128 and 8
    "L64_S4_K4": dict(length=64, heads=4, channels=4, points=4),  # Adaptor-T's S and K
    "L16_K8": dict(length=16, routes=2, heads=1, points=8),  # the parallel adaptor's K
    "C48_heads_straddle_lanes": dict(length=24, routes=2, heads=2, channels=48),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_reference(backend, case):
  args = make_inputs(sum(map(ord, case)), **CASES[case])
  assert_close(BACKENDS[backend], learned.reference, args, label=f"{backend} {case}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["read", "gamma", "scale"])
def test_without_gamma_or_scale_matches_reference(backend, form):
  args = make_inputs(3, length=20, gamma=form == "gamma", scale=form == "scale")
  assert_close(BACKENDS[backend], learned.reference, args, label=f"{backend} {form}")


@pytest.mark.usefixtures("race_states")
def test_pallas_has_no_races_on_a_ragged_image():
  args = make_inputs(4, length=136, routes=2, heads=1, points=1)
  fn = pallas_interpret(interpret=INTERPRET)
  assert_close(fn, learned.reference, args, label="pallas_tpu races")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_matches_fp32_reference(backend):
  """bf16 h (the models' compute dtype) against the reference on the same values in fp32, phi's
  product taken of w in bf16 too (the op's operands are in h's dtype)."""
  args = make_inputs(5, length=40, dtype=jnp.bfloat16)
  fp32 = lambda h, w, *a: learned.reference(h.astype(jnp.float32),
                                            w.astype(jnp.bfloat16).astype(jnp.float32), *a)
  assert_close(lambda h, *a: BACKENDS[backend](h, *a).astype(jnp.float32), fp32, args,
               BF16_TOL, BF16_TOL, label=f"{backend} bf16")


def test_pallas_keeps_only_its_inputs_for_the_backward():
  args = make_inputs(0, length=64)
  _, vjp = jax.vjp(pallas_interpret(), *args)
  h = args[0]
  residuals = jax.tree.leaves(vjp)
  assert max(x.size for x in residuals) <= h.size
  assert sum(x.size == h.size for x in residuals) == 1, "only h itself is h-sized"


def test_auto_backend_exports_the_mosaic_kernels_for_tpu():
  args = make_inputs(1, length=64)
  loss = lambda *a: jnp.sum(kernels.learned_read(*a).astype(jnp.float32))
  exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                                platforms=["tpu"])(*args)
  text = exported.mlir_module()
  assert "learned_read_fwd" in text and "learned_read_bwd" in text
  text = jax.jit(kernels.learned_read).lower(*args).as_text()
  assert "tpu_custom_call" not in text and "adaptor_read_fwd" in text  # the CPU kernels


@pytest.mark.parametrize("bad, match", [
    (lambda h, w, b, r: (h[0], w, b, r), r"h must be \(batch, L, G, C\)"),
    (lambda h, w, b, r: (h, w[:, 1:], b, r), r"w must be \(R, S C, 2 K S\)"),
    (lambda h, w, b, r: (h, w[:3], b, r), r"w must be \(R, S C, 2 K S\)"),
    (lambda h, w, b, r: (h, w[:0], b[:0], r), r"w must be \(R, S C, 2 K S\)"),
    (lambda h, w, b, r: (h, w[..., 1:], b[..., 1:], r), "w's last axis must be 2 K S"),
    (lambda h, w, b, r: (h, w, b[:, :2], r), r"b must be \(R, 2 K S\)"),
    (lambda h, w, b, r: (h, w, b, r[:2]), r"reach must be \(G,\)"),
    (lambda h, w, b, r: (h, w.astype(jnp.int32), b, r), "w must be floating point"),
])
def test_bad_arguments_are_named(bad, match):
  h, w, b, reach, gamma, scale = make_inputs(0)
  with pytest.raises(ValueError, match=match):
    kernels.learned_read(*bad(h, w, b, reach), gamma, scale)
  with pytest.raises(ValueError, match=r"learned_read: scale must be \(batch, G, L\)"):
    kernels.learned_read(h, w, b, reach, gamma, scale[:, :, 1:])


# ---------------------------------------------------------------------------------------------
# The real TPU compiler, without a TPU.

@pytest.mark.usefixtures("full_optimizations")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_compiles_for_a_tpu_chip(name, dtype):
  """Forward and forward+backward of Adaptor-T's call (4 routes x 4 heads, K = 4, gamma and
  scale) compile for a v5e chip at the model shapes and call the kernels, which take phi's
  product and its backward; XLA's cost analysis counts the kernels' bytes (h in, out; h and
  d out in, dh out) and FLOPs (phi's products at least)."""
  L, G, C = MODEL_SHAPES[name]
  batch, R, K = 2, 4, 4
  S = G // R
  device = jax.sharding.SingleDeviceSharding(deviceless.topology_devices("v5e", (1, 1))[0])
  spec = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=device)
  args = (spec((batch, L, G, C), dtype), spec((R, S * C, 2 * K * S)), spec((R, 2 * K * S)),
          spec((G,)), spec((G, C)), spec((batch, G, L)))
  op = learned.pallas_tpu
  loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32) ** 2)
  fwd = jax.jit(op).lower(*args).compile()
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4, 5))).lower(*args).compile()
  assert deviceless.custom_calls(fwd, "learned_read_fwd")
  assert deviceless.custom_calls(bwd, "learned_read_bwd")
  assert not deviceless.custom_calls(bwd, "memory_read")
  h_bytes = batch * L * G * C * jnp.dtype(dtype).itemsize
  phi_flops = 2 * batch * L * G * C * 2 * K * S
  fwd_cost, bwd_cost = deviceless.cost(fwd), deviceless.cost(bwd)
  assert fwd_cost["bytes"] >= 2 * h_bytes and fwd_cost["flops"] >= phi_flops
  assert bwd_cost["bytes"] >= 4 * h_bytes and bwd_cost["flops"] >= 3 * phi_flops


def test_default_blocks_fit_vmem_at_the_model_shapes():
  for L, G, C in MODEL_SHAPES.values():
    block_l = read_pallas_tpu.BlockSizes().for_shape(L).block_l
    cfg = read_pallas_tpu.ReadConfig(L, G, C, 8, block_l, True, True, True, False, has_phi=True)
    assert read_pallas_tpu._vmem_bytes(cfg, 2, backward=True) < read_pallas_tpu.VMEM_LIMIT_BYTES
