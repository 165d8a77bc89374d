"""The op's contract: the oracle against finite differences, the xla backend against the oracle,
argument checks, backend choice and the memory bound. The Pallas kernels have their own files."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import kernels
from kernels import reference
from scan_cases import ARG_NAMES, check_against_reference, check_unit_readout, make_inputs

# (batch, L, D, N, G, reverse, delta_softplus, with_z, with_D, dtype)
CASES = [
    (2, 64, 8, 1, 1, False, True, True, True, jnp.float32),
    (2, 64, 8, 16, 4, True, True, True, True, jnp.float32),
    (1, 1, 8, 16, 1, False, True, False, True, jnp.float32),
    (1, 1, 4, 1, 4, True, False, True, False, jnp.float32),
    (2, 7, 12, 16, 4, True, False, False, False, jnp.float32),
    (1, 7, 8, 1, 1, False, True, True, False, jnp.float32),
    (2, 100, 16, 4, 2, False, False, True, True, jnp.float32),
    (1, 2500, 8, 16, 2, True, True, True, True, jnp.float32),
    (1, 3001, 8, 1, 4, False, True, False, True, jnp.float32),
    (2, 64, 8, 16, 4, False, True, True, True, jnp.bfloat16),
    (1, 300, 8, 1, 4, True, True, True, True, jnp.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_xla_matches_reference(case):
  batch, length, d_inner, n_state, groups, reverse, softplus, with_z, with_D, dtype = case
  inputs = make_inputs(length + n_state, batch, length, d_inner, n_state, groups, dtype, with_z,
                       with_D)
  check_against_reference("xla", inputs, str(case), delta_softplus=softplus, reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_reference_gradients_match_finite_differences(reverse):
  with jax.enable_x64(True):
    inputs = make_inputs(7, batch=1, length=5, d_inner=4, n_state=2, groups=2)
    inputs = {k: v.astype(jnp.float64) for k, v in inputs.items()}
    fn = lambda *a: reference.selective_scan(*a, True, True, reverse)
    check_grads(fn, tuple(inputs[k] for k in ARG_NAMES), order=1, modes=["rev"], atol=1e-6,
                rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("reverse", [False, True])
def test_unit_readout_returns_the_hidden_states(backend, reverse):
  check_unit_readout(backend, reverse=reverse)


def test_last_state_only_on_request():
  inp = make_inputs(0, length=9)
  y = kernels.selective_scan(**inp, backend="xla")
  y2, last = kernels.selective_scan(**inp, backend="xla", return_last_state=True)
  np.testing.assert_array_equal(y, y2)
  assert last.shape == (2, 8, 1)


def test_auto_picks_per_platform_and_env_overrides(monkeypatch):
  inp = make_inputs(1, length=20, n_state=4)
  auto = lambda: kernels.selective_scan(**inp, delta_softplus=True)
  assert "platform_index" in str(jax.make_jaxpr(auto)())
  np.testing.assert_allclose(jax.jit(auto)(),
                             kernels.selective_scan(**inp, delta_softplus=True, backend="xla"),
                             rtol=1e-6, atol=1e-6)
  monkeypatch.setenv(kernels.api.ENV_VAR, "reference")
  jaxpr = str(jax.make_jaxpr(lambda: kernels.selective_scan(**inp, delta_softplus=True))())
  assert "platform_index" not in jaxpr and "custom_vjp" not in jaxpr


@pytest.mark.parametrize("change, message", [
    (dict(u=jnp.zeros((2, 64))), "u must be"),
    (dict(delta=jnp.zeros((2, 63, 8))), "delta must"),
    (dict(A=jnp.zeros((7, 1))), "A must"),
    (dict(B=jnp.zeros((2, 64, 1, 2))), "B must"),
    (dict(C=jnp.zeros((2, 64, 2, 1))), "same number of groups"),
    (dict(B=jnp.zeros((2, 64, 3, 1)), C=jnp.zeros((2, 64, 3, 1))), "do not split"),
    (dict(D=jnp.zeros((3,))), "D must"),
    (dict(delta_bias=jnp.zeros((8, 1))), "delta_bias must"),
    (dict(z=jnp.zeros((2, 64, 9))), "z must"),
    (dict(u=jnp.zeros((2, 64, 8), jnp.int32)), "floating point"),
])
def test_bad_arguments_name_the_argument(change, message):
  inp = {**make_inputs(0), **change}
  with pytest.raises(ValueError, match=message):
    kernels.selective_scan(**inp)


def test_unknown_backend():
  with pytest.raises(ValueError, match="unknown backend 'cuda'"):
    kernels.selective_scan(**make_inputs(0), backend="cuda")


def _temp_bytes_over_activation(backend, length, n_state):
  jax.config.update("jax_disable_most_optimizations", False)  # measure what users compile
  inp = make_inputs(0, batch=2, length=length, d_inner=64, n_state=n_state)
  loss = lambda x: jnp.sum(kernels.selective_scan(**x, delta_softplus=True, backend=backend))
  analysis = jax.jit(jax.grad(loss)).lower(inp).compile().memory_analysis()
  jax.config.update("jax_disable_most_optimizations", True)
  return analysis.temp_size_in_bytes / (2 * length * 64 * 4)


def test_xla_backward_memory_is_linear_in_batch_length_channels():
  """No (batch, L, D, N) tensor: at N = 16 the temporaries of forward+backward stay a few
  activations (the oracle, which keeps every state, needs ~N times more)."""
  xla = [_temp_bytes_over_activation("xla", length, 16) for length in (2048, 8192)]
  assert max(xla) < 8 and xla[1] <= xla[0], xla
  assert _temp_bytes_over_activation("reference", 2048, 16) > 16
