"""kernels.memory_read (Adaptor-T's interpolated read) against its oracles, every backend.

Oracles: `reference` (every tap gathered, autodiff) and the gather + einsum formulation Adaptor-T
used before the op existed, in Adaptor-T's own layout (routes x groups). Forward and every
gradient on fresh random inputs, at fractional locations, integer ones, the clip edges 0 and
L - 1 and the reverse routes' forward-looking locations. The Pallas TPU kernels run in interpret
mode with the race detector on and NaN-filled out-of-bounds reads (a ragged last chunk must be
masked), and compile for TPU chips through the deviceless AOT compiler at the model shapes.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import deviceless, read, read_pallas_tpu
from scan_cases import rel_err

INTERPRET = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="uninitialized")
FWD_TOL, GRAD_TOL, BF16_TOL = 1e-5, 1e-4, 1e-2


def make_inputs(seed, batch=2, length=37, groups=3, channels=8, points=4, reverse=False,
                dtype=jnp.float32, gamma=False, scale=False):
  """h, pos, weight (and gamma, scale when asked for) as Adaptor-T makes them: pos = clip(i -/+
  window * sigmoid(o)) (backward-looking, or forward-looking for a reverse route), so many sit
  exactly on the clip edges; a few are forced to integers, 0 and L - 1 exactly. Points first,
  positions last: pos, weight (batch, K, G, L), scale (batch, G, L)."""
  k_h, k_o, k_w, k_win, k_g, k_s = jax.random.split(jax.random.PRNGKey(seed), 6)
  h = jax.random.normal(k_h, (batch, length, groups, channels)).astype(dtype)
  window = length * jax.random.uniform(k_win, (groups, 1), minval=0.1, maxval=1.0)
  move = jax.nn.sigmoid(2.0 * jax.random.normal(k_o, (batch, points, groups, length)))
  i = jnp.arange(length, dtype=jnp.float32)
  pos = jnp.clip(i + (1.0 if reverse else -1.0) * window * move, 0.0, length - 1)
  pos = pos.at[:, 0, :, ::5].set(jnp.floor(pos[:, 0, :, ::5]))
  pos = pos.at[:, -1, :, :2].set(0.0).at[:, -1, :, -2:].set(length - 1.0)
  weight = jax.nn.softmax(jax.random.normal(k_w, (batch, points, groups, length)), axis=1)
  args = (h, pos, weight)
  if gamma or scale:
    args += (jax.random.normal(k_g, (groups, channels)) if gamma else None,
             jax.random.normal(k_s, (batch, groups, length)) if scale else None)
  return args


def value_and_grads(fn, args, seed=9):
  """fn(*args) and its vjp of a random cotangent, for every argument."""
  out, vjp = jax.vjp(fn, *args)
  ct = jax.random.normal(jax.random.PRNGKey(seed), out.shape).astype(out.dtype)
  return out, vjp(ct)


NAMES = ("out", "dh", "dpos", "dweight", "dgamma", "dscale")


def assert_close(fn, oracle, args, fwd_tol=FWD_TOL, grad_tol=GRAD_TOL, label=""):
  """fn against oracle on args (None for an absent gamma or scale): the output and the
  gradient of every argument given."""
  got = jax.jit(functools.partial(value_and_grads, fn))(args)
  want = jax.jit(functools.partial(value_and_grads, oracle))(args)
  pairs = [(NAMES[0], got[0], want[0], fwd_tol)] + [
      (name, g, w, grad_tol) for name, g, w in zip(NAMES[1:], got[1], want[1]) if w is not None]
  errors = {name: rel_err(g, w) for name, g, w, _ in pairs}
  print(f"\n{label}: rel errors {dict((k, '%.1e' % e) for k, e in errors.items())}")
  for name, _, _, tol in pairs:
    assert errors[name] <= tol, f"{label}: {name} rel error {errors[name]:.2e} > {tol}"


def pallas_interpret(block_l):
  return functools.partial(read.pallas_tpu, interpret=INTERPRET,
                           block_sizes=read_pallas_tpu.BlockSizes(block_l))


BACKENDS = {"xla": read.xla, "cpu": read.cpu, "pallas_tpu": pallas_interpret(128)}
CASES = {  # name: make_inputs kwargs
    "L136_ragged": dict(batch=1, length=136, groups=2, points=1),  # chunks of 128 and 8
    "L37_reverse": dict(batch=2, groups=1, points=3, reverse=True),
    "L64_K2_C16": dict(batch=1, length=64, groups=2, channels=16, points=2),
    "L40_C128_K1": dict(batch=1, length=40, groups=2, channels=128, points=1, reverse=True),
    "L1": dict(batch=1, length=1, groups=2, channels=8),
    "C48_heads_straddle_lanes": dict(batch=1, length=24, groups=3, channels=48, points=2),
    "L16_K8": dict(batch=1, length=16, groups=1, points=8),  # the parallel adaptor's K
}


@pytest.mark.usefixtures("race_states")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_reference(backend, case):
  args = make_inputs(sum(map(ord, case)), **CASES[case])
  assert_close(BACKENDS[backend], read.reference, args, label=f"{backend} {case}")


@pytest.mark.usefixtures("race_states")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form, case", [
    ("gamma_scale", "L136_ragged"), ("gamma_scale", "C48_heads_straddle_lanes"),
    ("gamma", "L37_reverse"), ("scale", "L37_reverse")])
def test_gamma_and_scale_match_reference(backend, form, case):
  """Adaptor-T's scale * (h + gamma * read), and each part alone: the output and the
  gradients of h, pos, weight, gamma and scale."""
  args = make_inputs(sum(map(ord, case + form)), **CASES[case], gamma="gamma" in form,
                     scale="scale" in form)
  assert_close(BACKENDS[backend], read.reference, args, label=f"{backend} {form} {case}")


@pytest.mark.usefixtures("race_states")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_matches_fp32_reference(backend):
  """bf16 h (the models' compute dtype) against the reference on the same values in fp32."""
  h, pos, weight, gamma, scale = make_inputs(5, batch=1, length=40, groups=2, channels=16,
                                             points=2, dtype=jnp.bfloat16, gamma=True,
                                             scale=True)
  fp32 = lambda h, *a: read.reference(h.astype(jnp.float32), *a)
  assert_close(lambda h, *a: BACKENDS[backend](h, *a).astype(jnp.float32), fp32,
               (h, pos, weight, gamma, scale), BF16_TOL, BF16_TOL, label=f"{backend} bf16")


def einsum_read(h_BLRD, p_BLRSK, c_BLRSK):
  """Adaptor-T's read as it was written before the op: gather the 2K taps of every (route,
  group) into one tensor, then contract them with their weights."""
  B, L, R, D = h_BLRD.shape
  S, K = p_BLRSK.shape[-2:]
  p0 = jnp.floor(p_BLRSK)
  frac = p_BLRSK - p0
  p0 = p0.astype(jnp.int32)
  idx_BLRSJ = jnp.concatenate([p0, jnp.minimum(p0 + 1, L - 1)], axis=-1)
  w_BLRSJ = jnp.concatenate([c_BLRSK * (1.0 - frac), c_BLRSK * frac], axis=-1)
  h_BLRSd = h_BLRD.reshape(B, L, R, S, D // S)
  idx = idx_BLRSJ.transpose(0, 1, 4, 2, 3).reshape(B, L * 2 * K, R, S, 1)
  taps = jnp.take_along_axis(h_BLRSd, idx, axis=1).reshape(B, L, 2 * K, R, S, D // S)
  return jnp.einsum("bljrsd,blrsj->blrsd", taps, w_BLRSJ).reshape(B, L, R, D)


@pytest.mark.usefixtures("race_states")
@pytest.mark.parametrize("backend", ["auto", "pallas_tpu"])
def test_matches_the_einsum_formulation_in_adaptor_layout(backend):
  """Four routes (the last two reverse) x S = 2 groups, each of D / S channels, called the way
  Adaptor-T calls the op (heads = (route, group), per-position arguments positions-last,
  gamma per route and channel, the scan's C per route), against y = C (h + gamma read) with
  the read written as it was before the op."""
  B, L, R, S, K, D = 1, 20, 4, 2, 2, 8
  parts = [make_inputs(r, batch=B, length=L, groups=S, channels=D // S, points=K, reverse=r >= 2)
           for r in range(R)]
  h_BLRD = jnp.stack([p[0].reshape(B, L, D) for p in parts], axis=2)
  p_BLRSK, c_BLRSK = (jnp.stack([jnp.transpose(p[i], (0, 3, 2, 1)) for p in parts], axis=2)
                      for i in (1, 2))
  gamma_RD = jax.random.normal(jax.random.PRNGKey(7), (R, D))
  C_BLR = jax.random.normal(jax.random.PRNGKey(8), (B, L, R))
  fn = kernels.memory_read if backend == "auto" else pallas_interpret(None)
  last = lambda x: jnp.transpose(x, (0, 4, 2, 3, 1)).reshape(B, K, R * S, L)  # heads (r, s)

  def op(h, p, c, gamma, C):
    scale = jnp.repeat(jnp.moveaxis(C, 1, -1), S, axis=1)
    return fn(h.reshape(B, L, R * S, D // S), last(p), last(c),
              gamma.reshape(R * S, D // S), scale).reshape(B, L, R, D)

  def oracle(h, p, c, gamma, C):
    return C[..., None] * (h + gamma * einsum_read(h, p, c))

  assert_close(op, oracle, (h_BLRD, p_BLRSK, c_BLRSK, gamma_RD, C_BLR),
               label=f"{backend} vs einsum")


def test_gradients_match_finite_differences():
  """The hand-written backward against float32 central differences, pos mid-way between rows
  (where the read is linear in it)."""
  h, pos, weight = make_inputs(3, batch=1, length=12, groups=1, channels=4, points=2)
  pos = jnp.floor(pos) + 0.5  # mid-way between rows: d read / d pos is constant around here
  ct = jax.random.normal(jax.random.PRNGKey(1), h.shape)
  loss = lambda h, p, w: jnp.sum(read.xla(h, p, w) * ct)
  g_h, g_p, g_w = jax.grad(loss, argnums=(0, 1, 2))(h, pos, weight)
  eps = 1e-2
  for arg, grad, index in ((1, g_p, (0, 1, 0, 7)), (2, g_w, (0, 0, 0, 4)), (0, g_h, (0, 3, 0, 2))):
    args = [h, pos, weight]
    up = [a.at[index].add(eps) if i == arg else a for i, a in enumerate(args)]
    down = [a.at[index].add(-eps) if i == arg else a for i, a in enumerate(args)]
    numeric = (loss(*up) - loss(*down)) / (2 * eps)
    np.testing.assert_allclose(grad[index], numeric, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", ["xla", "cpu"])
def test_keeps_no_tap_tensor_for_the_backward(backend):
  """The residuals of the xla path and the CPU kernels are their inputs: nothing of size
  2K x h is saved, and neither the read nor h'."""
  args = make_inputs(0, batch=2, length=64, groups=4, channels=16, points=4, gamma=True,
                     scale=True)
  _, vjp = jax.vjp(BACKENDS[backend], *args)
  residuals = jax.tree.leaves(vjp)
  assert max(x.size for x in residuals) <= args[0].size
  assert sum(x.size == args[0].size for x in residuals) == 1, "only h itself is h-sized"


def test_auto_backend_and_environment_override(monkeypatch):
  h, pos, weight = make_inputs(1)
  text = jax.jit(kernels.memory_read).lower(h, pos, weight).as_text()
  assert "tpu_custom_call" not in text and "adaptor_read_fwd" in text  # the CPU kernels
  want = read.reference(h, pos, weight)
  monkeypatch.setenv(read.ENV_VAR, "reference")
  assert rel_err(kernels.memory_read(h, pos, weight), want) <= FWD_TOL
  monkeypatch.setenv(read.ENV_VAR, "nonsense")
  with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
    kernels.memory_read(h, pos, weight)


def test_cpu_kernels_not_built_is_named(monkeypatch):
  """Without the compiled library the CPU backend says what to run, where it would lower for
  the CPU; traced on another host (auto's unused branch) it is left to that host's lowering."""
  from kernels import read_cpu  # noqa: PLC0415
  monkeypatch.setattr(read_cpu, "register", lambda: False)
  with pytest.raises(RuntimeError, match=r"not built; run `pip install -e \.`"):
    read.cpu(*make_inputs(2))
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  jax.make_jaxpr(read.cpu)(*make_inputs(2))


def test_auto_backend_exports_the_mosaic_kernels_for_tpu():
  h, pos, weight = make_inputs(1, length=64)
  loss = lambda *a: jnp.sum(kernels.memory_read(*a).astype(jnp.float32))
  exported = jax.export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                                platforms=["tpu"])(
      h, pos, weight)
  text = exported.mlir_module()
  assert "memory_read_fwd" in text and "memory_read_bwd" in text


@pytest.mark.parametrize("bad, match", [
    (lambda h, p, w, g, s: (h[0], p, w, g, s), r"h must be \(batch, L, G, C\)"),
    (lambda h, p, w, g, s: (h, p[:, :, 1:], w, g, s), r"pos must be \(batch, K, G, L\)"),
    (lambda h, p, w, g, s: (h, jnp.moveaxis(p, -1, 1), w, g, s), "pos must be"),
    (lambda h, p, w, g, s: (h, p, w[:, :2], g, s), "the same shape"),
    (lambda h, p, w, g, s: (h.astype(jnp.int32), p, w, g, s), "h must be floating point"),
    (lambda h, p, w, g, s: (h[:, :0], p[..., :0], w[..., :0], g, s[..., :0]), "L = 0"),
    (lambda h, p, w, g, s: (h, p, w, g[:, :2], s), r"gamma must be \(G, C\)"),
    (lambda h, p, w, g, s: (h, p, w, g, jnp.moveaxis(s, -1, 1)),
     r"scale must be \(batch, G, L\)"),
])
def test_bad_arguments_are_named(bad, match):
  with pytest.raises(ValueError, match=match):
    kernels.memory_read(*bad(*make_inputs(0, gamma=True, scale=True)))


def test_auto_backend_on_tpu_follows_what_an_image_needs_of_vmem():
  """backend "auto" on TPU, in both ops: the Mosaic kernels both ways where one image fits a
  core's VMEM in the backward; their forward with XLA's backward where only the forward fits;
  XLA's gathers where neither does."""
  def exported(length):
    h = jax.ShapeDtypeStruct((1, length, 1, 128), jnp.float32)
    p = jax.ShapeDtypeStruct((1, 4, 1, length), jnp.float32)
    w = jax.ShapeDtypeStruct((1, 128, 8), jnp.float32)
    b, reach = jax.ShapeDtypeStruct((1, 8), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)
    read_loss = lambda *a: jnp.sum(kernels.memory_read(*a))
    learned_loss = lambda *a: jnp.sum(kernels.learned_read(*a))
    return [jax.export.export(jax.jit(jax.value_and_grad(f)), platforms=["tpu"])(
        *a).mlir_module()
            for f, a in ((read_loss, (h, p, p)), (learned_loss, (h, w, b, reach)))]
  small, medium, large = exported(4096), exported(150_000), exported(300_000)
  for op, texts in zip(("memory_read", "learned_read"), zip(small, medium, large)):
    assert f"{op}_fwd" in texts[0] and f"{op}_bwd" in texts[0]
    assert f"{op}_fwd" in texts[1] and f"{op}_bwd" not in texts[1]  # 73 MiB of float32 rows
    assert "tpu_custom_call" not in texts[2]  # 146 MiB


def test_forward_only_is_the_kernels_forward_with_xlas_backward():
  """What "auto" runs where only the forward fits: the kernels' values, xla's gradients."""
  args = make_inputs(3, gamma=True, scale=True)
  kernel = functools.partial(read.pallas_tpu, interpret=INTERPRET)
  mixed = lambda *a: jnp.sum(jnp.sin(read._forward_only(kernel, read.xla, *a)))
  plain = lambda *a: jnp.sum(jnp.sin(read.xla(*a)))
  (value, grads), (want, want_grads) = (jax.value_and_grad(f, argnums=range(5))(*args)
                                        for f in (mixed, plain))
  assert rel_err(value, want) <= FWD_TOL
  for got, ref in zip(grads, want_grads):  # the cotangent is cos of each one's output
    assert rel_err(got, ref) <= GRAD_TOL


def test_pallas_block_and_vmem_limits_are_named():
  h, pos, weight = make_inputs(0, length=64)
  with pytest.raises(ValueError, match="block_l=12 must be a multiple of 128"):
    read.pallas_tpu(h, pos, weight, interpret=INTERPRET,
                    block_sizes=read_pallas_tpu.BlockSizes(block_l=12))
  big = jax.ShapeDtypeStruct((1, 300_000, 1, 128), jnp.float32)  # 146 MiB of float32 rows
  p = jax.ShapeDtypeStruct((1, 4, 1, 300_000), jnp.float32)
  with pytest.raises(ValueError, match="MiB of VMEM"):
    jax.eval_shape(lambda *a: read.pallas_tpu(*a), big, p, p)


@pytest.mark.parametrize("chip, mib", [("v5e", 120), ("v5p", 60), ("v4", 15)])
def test_vmem_limit_follows_the_chip_of_the_mesh(chip, mib):
  """Under a mesh of TPU chips (as the train step traces the kernels) the limit is 15/16 of the
  chip's VMEM per core, at most VMEM_LIMIT_BYTES; without a TPU in sight, VMEM_LIMIT_BYTES. An
  image that fits v5e but not v4 is refused by name on v4."""
  assert read_pallas_tpu.vmem_limit() == read_pallas_tpu.VMEM_LIMIT_BYTES == 120 * 2**20
  devices = deviceless.topology_devices(chip, deviceless.CHIPS[chip].slice_shape(1))
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  h = jax.ShapeDtypeStruct((1, 3136, 16, 48), jnp.bfloat16)  # b2's stage 1 at 224
  p = jax.ShapeDtypeStruct((1, 4, 16, 3136), jnp.float32)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    assert read_pallas_tpu.vmem_limit() == mib * 2**20
    backward = jax.grad(lambda h, p, w: read.pallas_tpu(h, p, w).astype(jnp.float32).sum())
    if chip == "v4":
      with pytest.raises(ValueError, match=r"needs 2\d MiB of VMEM \(limit 15 MiB\)"):
        jax.eval_shape(backward, h, p, p)
    else:
      jax.eval_shape(backward, h, p, p)


# ---------------------------------------------------------------------------------------------
# The real TPU compiler, without a TPU.

# (L, G, C) of Adaptor-T's heads: VMamba-T's booster at stage 1 (d_inner 96, S 4 groups x 4
# routes), b2's stages 1 and 4 (d_inner 192 and 1536).
MODEL_SHAPES = {"vmamba_t_stage1": (3136, 16, 24), "b2_stage1": (3136, 16, 48),
                "b2_stage4": (49, 16, 384)}


@pytest.mark.usefixtures("full_optimizations")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_compiles_for_a_tpu_chip(name, dtype):
  """Forward and forward+backward of Adaptor-T's call (gamma and scale) compile for a v5e chip
  at the model shapes, call the kernels, and hold no temporary near the size of the 2K taps."""
  L, G, C = MODEL_SHAPES[name]
  batch, K = 2, 4
  device = jax.sharding.SingleDeviceSharding(deviceless.topology_devices("v5e", (1, 1))[0])
  spec = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=device)
  args = (spec((batch, L, G, C), dtype), spec((batch, K, G, L)), spec((batch, K, G, L)),
          spec((G, C)), spec((batch, G, L)))
  op = read.pallas_tpu
  loss = lambda *a: jnp.sum(op(*a).astype(jnp.float32) ** 2)
  fwd = jax.jit(op).lower(*args).compile()
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
  assert deviceless.custom_calls(fwd, "memory_read_fwd")
  assert deviceless.custom_calls(bwd, "memory_read_bwd")
  tap_bytes = batch * L * G * 2 * K * C * jnp.dtype(dtype).itemsize
  temps = deviceless.memory(bwd)["temporaries"]
  print(f"\n{name} {jnp.dtype(dtype).name}: fwd+bwd temporaries {temps / 2**20:.1f} MiB, "
        f"the taps would be {tap_bytes / 2**20:.1f} MiB")
  assert temps < tap_bytes / 4


def test_default_blocks_fit_vmem_at_the_model_shapes():
  for L, G, C in MODEL_SHAPES.values():
    block_l = read_pallas_tpu.BlockSizes().for_shape(L).block_l
    cfg = read_pallas_tpu.ReadConfig(L, G, C, 8, block_l, True, True, True, False)
    assert read_pallas_tpu._vmem_bytes(cfg, 2, backward=True) < read_pallas_tpu.VMEM_LIMIT_BYTES
