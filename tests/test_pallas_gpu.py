"""The Pallas Triton backend (kernels/pallas_gpu.py) against the reference, in interpret mode,
and its lowering for CUDA (jax.export) without a GPU."""
import functools
import re

import jax
import jax.numpy as jnp
import pytest

import kernels
from kernels import pallas_gpu
from scan_cases import (MODEL_SHAPES, check_against_reference, check_unit_readout, export_args,
                        largest_tensor, make_inputs)

TRITON_CALL = "__gpu$xla.gpu.triton"


def _backend(**blocks):
  return functools.partial(pallas_gpu.selective_scan, interpret=True,
                           block_sizes=pallas_gpu.BlockSizes(**blocks))


# (batch, L, D, G, N, block_l, reverse, with_z, with_D, delta_softplus)
CASES = [
    (2, 1, 8, 1, 1, None, False, True, True, True),        # L = 1
    (2, 7, 16, 4, 16, None, True, True, True, True),       # L = 7, 4 groups, reverse
    (2, 64, 16, 4, 1, 16, False, False, False, False),     # 4 full chunks, no z, D = None
    (1, 64, 16, 1, 16, 24, True, True, True, True),        # partial last chunk, reverse, batch 1
    (2, 50, 8, 2, 16, 16, False, False, True, True),       # partial last chunk, forward
    (1, 9, 384, 4, 1, 4, True, True, True, False),         # 96-channel groups: 3 tiles of 32
    (1, 2000, 8, 1, 1, None, True, True, True, True),      # long L, 31 chunks + 16 steps
    (2, 20, 8, 2, 3, 8, True, True, True, True),           # N = 3 padded to 4 in registers
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_L{}_D{}_G{}_N{}_c{}_rev{}_z{}_D{}_sp{}".format(*c))
def test_matches_reference_fp32(case):
  batch, length, d_inner, groups, n_state, block_l, reverse, with_z, with_D, softplus = case
  inputs = make_inputs(sum(case[:5]), batch=batch, length=length, d_inner=d_inner,
                       n_state=n_state, groups=groups, with_z=with_z, with_D=with_D)
  check_against_reference(_backend(block_l=block_l), inputs, str(case), reverse=reverse,
                          delta_softplus=softplus)


@pytest.mark.parametrize("reverse", [False, True])
def test_matches_reference_bf16(reverse):
  inputs = make_inputs(7 + reverse, batch=2, length=33, d_inner=16, n_state=16, groups=2,
                       dtype=jnp.bfloat16)
  check_against_reference(_backend(block_l=8), inputs, "bf16", reverse=reverse,
                          delta_softplus=True)


def test_jit_and_block_d_override():
  inputs = make_inputs(11, batch=2, length=20, d_inner=32, n_state=1, groups=1)
  check_against_reference(_backend(block_d=8, block_l=6), inputs, "block_d=8 block_l=6",
                          delta_softplus=True)


def test_block_sizes_default_and_validation():
  assert pallas_gpu.BlockSizes().for_shape(2000, 384, 1, 4) == pallas_gpu.BlockSizes(32, 64)
  assert pallas_gpu.BlockSizes().for_shape(20, 24, 16, 1) == pallas_gpu.BlockSizes(8, 20)
  with pytest.raises(ValueError, match="block_d=6 must be a power of two dividing D // G = 96"):
    pallas_gpu.BlockSizes(block_d=6).for_shape(64, 384, 1, 4)


@pytest.mark.parametrize("reverse", [False, True])
def test_unit_readout_returns_the_hidden_states(reverse):
  check_unit_readout(_backend(block_l=16), reverse=reverse)


# The model shapes, and one with N = 3 (padded to 4 in registers).
EXPORT_SHAPES = {**MODEL_SHAPES, "n3": (2, 100, 64, 2, 3)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", EXPORT_SHAPES)
def test_lowers_for_cuda(name, dtype):
  batch, length, d_inner, _, n_state = shape = EXPORT_SHAPES[name]
  args = export_args(shape, dtype)

  def fwd(*a):  # backend="auto" must pick the Triton kernels when lowered for CUDA
    return kernels.selective_scan(*a, delta_softplus=True, return_last_state=True)

  def fwd_bwd(*a):
    (y, last), vjp = jax.vjp(fwd, *a)
    return y, last, vjp((y, last))

  checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  for fn, n_calls in ((fwd, 1), (fwd_bwd, 2)):
    exp = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    text = exp.mlir_module()
    calls = re.findall(r"stablehlo.custom_call @(\S+)\(", text)
    assert calls.count(TRITON_CALL) == n_calls, calls
    assert re.findall(r'name = "(selective_scan_\w+)"', text)[-n_calls:] == (
        ["selective_scan_fwd", "selective_scan_bwd"][:n_calls]), text[-2000:]
    if n_state > 1:  # nothing the size of the (batch, L, D, N) states reaches HBM
      assert largest_tensor(text) < batch * length * d_inner * n_state
    out_y = exp.out_avals[0]
    assert out_y.shape == (batch, length, d_inner) and out_y.dtype == dtype
