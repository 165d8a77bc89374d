"""The Pallas TPU (Mosaic) selective scan against the reference, in TPU interpret mode on CPU.

Every kernel run goes through the public op with the race detector on and out-of-bounds block
reads returning NaN-filled "uninitialized" memory, so a ragged last chunk must be masked. The
lowering tests export the real (non-interpret) kernels for TPU at the model shapes, and the
compile tests run the real TPU compiler (libtpu, deviceless) on them for v5e, v4 and v5p chips.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import deviceless, pallas_tpu
from scan_cases import (MODEL_SHAPES, check_against_reference, check_unit_readout, export_args,
                        largest_tensor, make_inputs)

INTERPRET = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="uninitialized")


pytestmark = pytest.mark.usefixtures("race_states")  # every interpreted kernel is race-free


def pallas_backend(**blocks):
  return functools.partial(pallas_tpu.selective_scan, interpret=INTERPRET,
                           block_sizes=pallas_tpu.BlockSizes(**blocks))


# (name, make_inputs kwargs, block sizes, flags). Blocks are small to give several chunks and tiles.
CASES = [
    ("n1_g1_L64", dict(batch=2, length=64, d_inner=8), dict(block_l=16),
     dict(delta_softplus=True, reverse=False)),
    ("n16_g2_L40_reverse_ragged", dict(batch=2, length=40, d_inner=16, n_state=16, groups=2),
     dict(block_l=16), dict(delta_softplus=True, reverse=True)),
    ("n16_g1_L37_ragged_noD", dict(batch=1, length=37, d_inner=8, n_state=16, with_D=False),
     dict(block_l=8), dict(delta_softplus=False, reverse=False)),
    ("n1_g4_D384_3tiles_reverse_noz_noD", dict(batch=1, length=24, d_inner=384, groups=4,
                                               with_z=False, with_D=False),
     dict(block_l=8, block_d=128), dict(delta_softplus=False, reverse=True)),
    ("n1_g1_L1_noz", dict(batch=1, length=1, d_inner=8, with_z=False), {},
     dict(delta_softplus=True, reverse=False)),
    ("n1_g1_L7_reverse_nosoftplus", dict(batch=1, length=7, d_inner=8), dict(block_l=16),
     dict(delta_softplus=False, reverse=True)),
    ("n1_g1_L2000_default_blocks", dict(batch=1, length=2000, d_inner=8), {},
     dict(delta_softplus=True, reverse=False)),
]


@pytest.mark.parametrize("name,shape,blocks,flags", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_reference(name, shape, blocks, flags):
  inputs = make_inputs(len(name), **shape)
  y = check_against_reference(pallas_backend(**blocks), inputs, name, **flags)
  if name == "n1_g1_L64":  # return_last_state=False gives y alone, the same y
    y_alone = kernels.selective_scan(**inputs, **flags, backend=pallas_backend(**blocks))
    assert not isinstance(y_alone, tuple)
    np.testing.assert_array_equal(np.asarray(y_alone), np.asarray(y))


def test_bf16_matches_reference():
  inputs = make_inputs(11, batch=2, length=40, d_inner=16, groups=4, dtype=jnp.bfloat16)
  check_against_reference(pallas_backend(block_l=16), inputs, "bf16_n1_g4_L40",
                          delta_softplus=True, reverse=False)


@pytest.mark.parametrize("reverse", [False, True])
def test_unit_readout_returns_the_hidden_states(reverse):
  check_unit_readout(pallas_backend(block_l=8), reverse=reverse)


def test_race_detector_is_observed(race_states):
  """Positive control for the autouse race check: a kernel reading a buffer that a DMA is still
  writing is reported, so the check above is not vacuous."""
  def racy(x_hbm, o_ref, buf, sem):
    copy = pltpu.make_async_copy(x_hbm, buf, sem)
    copy.start()
    o_ref[...] = buf[...]
    copy.wait()

  out = pl.pallas_call(
      racy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
      scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32), pltpu.SemaphoreType.DMA(())],
      interpret=INTERPRET)(jnp.ones((8, 128)))
  jax.block_until_ready(out)
  assert race_states and any(s.races_found for s in race_states)
  race_states.clear()


def test_block_choice_fits_vmem():
  """The default blocks of the model shapes: lane-dense tiles, and the backward kernel's VMEM
  (double-buffered blocks + scratch, with Mosaic's (8, 128) padding) well under 16 MiB."""
  pad = lambda rows, lanes: pl.cdiv(rows, 8) * 8 * pl.cdiv(lanes, 128) * 128 * 4
  for length, d_inner, groups, n_state in [(3136, 384, 4, 1), (784, 768, 4, 1),
                                           (196, 1536, 4, 1), (49, 3072, 4, 1),
                                           (197, 384, 1, 16)]:
    gn = groups * n_state
    blocks = pallas_tpu.BlockSizes().for_shape(length, d_inner, n_state, groups)
    block_d, block_l = blocks.block_d, blocks.block_l
    assert d_inner % block_d == 0 and block_d % 128 == 0
    assert block_l == length or block_l % 16 == 0
    blocks = 2 * (7 * pad(block_l, block_d) + 4 * pad(block_l, gn) + 4 * pad(n_state, block_d))
    scratch = (7 + n_state) * pad(block_l, block_d) + 4 * pad(block_l, gn)
    print(f"\nblocks {length, d_inner, groups, n_state}: block_l={block_l} block_d={block_d} "
          f"VMEM {(blocks + scratch) / 2**20:.1f} MiB")
    assert blocks + scratch <= 12 * 2**20
  with pytest.raises(ValueError, match="block_d=100 must be D=384 or a multiple of 128"):
    pallas_tpu.BlockSizes(block_d=100).for_shape(64, 384, 1, 1)
  with pytest.raises(ValueError, match="block_l=12 must be a multiple of 8"):
    pallas_tpu.BlockSizes(block_l=12).for_shape(64, 384, 1, 1)
  assert pallas_tpu.BlockSizes(block_l=1024).for_shape(64, 384, 1, 1).block_l == 64


# ---------------------------------------------------------------------------------------------
# Lowering for TPU without hardware: jax.export of the Mosaic kernels.

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_exports_for_tpu(name, dtype):
  shape = MODEL_SHAPES[name]
  args = export_args(shape, dtype)
  scan = lambda *a: pallas_tpu.selective_scan(*a, True, True, name == "vim_t")

  def loss(*a):
    y, last = scan(*a)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(last)

  fwd = jax.export.export(jax.jit(scan), platforms=["tpu"])(*args).mlir_module()
  bwd = jax.export.export(jax.jit(jax.grad(loss, argnums=tuple(range(8)))),
                          platforms=["tpu"])(*args).mlir_module()
  assert fwd.count("tpu_custom_call") >= 1
  assert bwd.count("tpu_custom_call") >= 2  # the forward (residuals) and the backward kernel
  assert "selective_scan_fwd" in fwd and "selective_scan_bwd" in bwd
  batch, length, d_inner, _, n_state = shape
  if n_state > 1:  # nothing the size of the (batch, L, D, N) states reaches HBM
    assert largest_tensor(bwd) < batch * length * d_inner * n_state


def test_auto_backend_exports_the_mosaic_kernels_for_tpu():
  """kernels.selective_scan(backend="auto") picks this backend when lowered for TPU."""
  inputs = make_inputs(0, batch=2, length=64, d_inner=256, n_state=1, groups=4)
  args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in inputs.items()}
  f = lambda kw: kernels.selective_scan(**kw, delta_softplus=True)
  text = jax.export.export(jax.jit(jax.grad(lambda kw: jnp.sum(f(kw)))),
                           platforms=["tpu"])(args).mlir_module()
  assert "selective_scan_fwd" in text and "selective_scan_bwd" in text


# ---------------------------------------------------------------------------------------------
# The real TPU compiler, without a TPU: Mosaic and XLA:TPU compile the kernels for one chip.

@functools.cache
def one_chip(chip):
  return jax.sharding.SingleDeviceSharding(
      deviceless.topology_devices(chip, deviceless.CHIPS[chip].slice_shape(1))[0])


@pytest.mark.usefixtures("full_optimizations")
@pytest.mark.parametrize("chip", sorted(deviceless.CHIPS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODEL_SHAPES)
def test_compiles_for_tpu_chips(name, dtype, chip):
  """Forward and forward+backward compile at the model shapes; the compiled programs call the
  kernels, XLA's cost analysis counts their bytes (it counts a kernel as nothing unless told),
  and none holds a temporary the size of the (batch, L, D, N) states."""
  shape = MODEL_SHAPES[name]
  device = one_chip(chip)
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device) for a in export_args(shape, dtype)]
  scan = lambda *a: pallas_tpu.selective_scan(*a, True, True, name == "vim_t")

  def loss(*a):
    y, last = scan(*a)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(last)

  fwd = jax.jit(scan).lower(*args).compile()
  bwd = jax.jit(jax.grad(loss, argnums=tuple(range(8)))).lower(*args).compile()
  assert deviceless.custom_calls(fwd, "selective_scan_fwd")
  assert deviceless.custom_calls(bwd, "selective_scan_fwd")
  assert deviceless.custom_calls(bwd, "selective_scan_bwd")
  batch, length, d_inner, _, n_state = shape
  moved = 2 * batch * length * d_inner * jnp.dtype(dtype).itemsize  # u and y at least
  assert deviceless.cost(fwd)["bytes"] >= moved and deviceless.cost(bwd)["bytes"] >= 2 * moved
  states = batch * length * d_inner * n_state * 4
  temps = deviceless.memory(bwd)["temporaries"]
  print(f"\n{name} {jnp.dtype(dtype).name} {chip}: fwd+bwd temporaries {temps / 2**20:.1f} MiB, "
        f"states {states / 2**20:.1f} MiB")
  if n_state > 1:
    assert temps < states
