"""Parameter and FLOP counts of the presets, their output and stage-feature shapes, and the FLOP
counter's dense and conv parts cross-checked against XLA's own cost analysis."""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from flax import nnx

from adaptor_jax.models import counting, registry, vmamba

# Measured at 224x224 with a 1000-class head: (params, multiply-adds).
MEASURED = {
    "mamba_adaptor_b1": (7_720_600, 1_430_853_440),
    "mamba_adaptor_b2": (32_013_608, 5_364_419_328),
    "vmamba_tiny": (30_249_064, 4_905_609_984),
    "vmamba_small": (50_147_752, 8_715_774_720),
    "vmamba_base": (88_557_800, 15_358_944_256),
    "adaptor_vmamba_tiny": (31_090_664, 5_201_171_712),
    "adaptor_vmamba_small": (52_700_968, 9_503_939_328),
    "adaptor_vmamba_base": (91_961_192, 16_409_830_400),
}
# DESIGN.md's table: (params, GFLOPs); the VMamba rows are exact (official code + fvcore).
TARGETS = {
    "mamba_adaptor_b1": (7.8e6, 1.4), "mamba_adaptor_b2": (32e6, 5.4),
    "vmamba_tiny": (30_249_064, 4.906), "vmamba_small": (50_147_752, 8.716),
    "vmamba_base": (88_557_800, 15.359), "adaptor_vmamba_tiny": (31e6, 5.2),
    "adaptor_vmamba_small": (53e6, 9.3), "adaptor_vmamba_base": (94e6, 16.5),
}


@functools.cache
def abstract(name):
  return nnx.eval_shape(lambda: registry.create_model(name, rngs=nnx.Rngs(0)))


def output_shapes(model, batch, size, **kw):
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, **kw), state, x)
  return jax.tree.map(lambda a: a.shape, out)


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_counts(name):
  model = abstract(name)
  params, flops = counting.count_params(model), counting.count_flops(model, 224)
  print(f"{name}: {params:,} params, {flops / 1e9:.3f} GFLOPs")
  assert (params, flops) == MEASURED[name]
  want_params, want_gflops = TARGETS[name]
  if name.startswith("vmamba_"):
    assert params == want_params and round(flops / 1e9, 3) == want_gflops
  assert abs(params / want_params - 1) <= 0.03
  assert abs(flops / 1e9 / want_gflops - 1) <= 0.03


@pytest.mark.parametrize("name", [n for n in registry.list_models()
                                  if registry.task_of(n) == "classification"])
def test_output_shapes(name):
  model = abstract(name)
  assert output_shapes(model, 2, 64) == (2, 1000)
  assert output_shapes(model, 1, 224) == (1, 1000)
  if name in MEASURED:
    d = model.dims
    assert output_shapes(model, 2, 64, return_features=True) == [
        (2, 16, 16, d[0]), (2, 8, 8, d[1]), (2, 4, 4, d[2]), (2, 2, 2, d[3])]
    assert output_shapes(model, 1, 224, return_features=True) == [
        (1, 56, 56, d[0]), (1, 28, 28, d[1]), (1, 14, 14, d[2]), (1, 7, 7, d[3])]


def _dense_and_conv(jaxpr):
  """The model's dot_general and conv equations, outside the ops counted by their own rules."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      yield eqn
    if eqn.params.get("name") in counting.NAMED:
      continue
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _dense_and_conv(sub)


def _xla_flops(eqn):
  """XLA's flop count of one equation. XLA skips the taps that fall in a conv's zero padding
  while fvcore (and we) count them, so convs are re-posed on an explicitly padded input."""
  args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
  params = dict(eqn.params)
  if eqn.primitive.name == "conv_general_dilated":
    spatial = params["dimension_numbers"].lhs_spec[2:]
    shape = list(args[0].shape)
    for axis, (lo, hi) in zip(spatial, params["padding"]):
      shape[axis] += lo + hi
    args[0] = jax.ShapeDtypeStruct(tuple(shape), args[0].dtype)
    params["padding"] = tuple((0, 0) for _ in spatial)
  lowered = jax.jit(lambda *a: eqn.primitive.bind(*a, **params)).lower(*args)
  return lowered.cost_analysis()["flops"]


def test_dense_and_conv_counts_agree_with_xla():
  """adaptor_vmamba_tiny at 64x64: every dot_general and convolution (strided, grouped, dilated)."""
  model = abstract("adaptor_vmamba_tiny")
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr
  ours = {}
  counting.count_jaxpr(jaxpr, ours)
  xla = {"dot_general": 0, "conv_general_dilated": 0}
  cache = {}
  for eqn in _dense_and_conv(jaxpr):
    key = (eqn.primitive.name, str(eqn.params), tuple(v.aval.shape for v in eqn.invars))
    if key not in cache:
      cache[key] = _xla_flops(eqn)
    xla[eqn.primitive.name] += cache[key]
  print(f"ours {ours}, XLA / 2 {dict((k, v / 2) for k, v in xla.items())}")
  assert xla["dot_general"] == 2 * ours["dot_general"]
  assert xla["conv_general_dilated"] == 2 * ours["conv_general_dilated"]


# Table 4 of the paper: trainable params of the parallel adaptor (+ a 100-class head)
TABLE4_ADAPTOR = {"vmamba_tiny": 1.68e6, "vmamba_small": 5.10e6, "vmamba_base": 6.8e6}
OURS_TRAINABLE = {  # python -m adaptor_jax.summary --model=NAME --num_classes=100 ...
    ("vmamba_tiny", "adaptor"): 1_585_380, ("vmamba_small", "adaptor"): 4_649_572,
    ("vmamba_base", "adaptor"): 6_197_604, ("vmamba_tiny", "share"): 497_060,
    ("vmamba_tiny", "linear"): 78_436}


@pytest.mark.parametrize("name,method", sorted(OURS_TRAINABLE))
def test_transfer_trainable_counts(name, method):
  """What summary.py prints as trainable (its FLOPs count is left out here: it is slow)."""
  overrides = {} if method == "linear" else dict(form="adaptor", share_adaptor=method == "share")
  model = nnx.eval_shape(lambda: registry.create_model(name, num_classes=100, rngs=nnx.Rngs(0),
                                                       **overrides))
  trainable = counting.count_params(model, vmamba.trainable(model, head_only=method == "linear"))
  assert trainable == OURS_TRAINABLE[name, method]
  if method == "linear":
    assert trainable == 768 * 100 + 100 + 2 * 768
  if method == "adaptor":
    assert abs(trainable / TABLE4_ADAPTOR[name] - 1) <= 0.10
