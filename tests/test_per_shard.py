"""kernels/per_shard.py: under a mesh every kernel call runs once per shard of the batch.

The multi-device cases run in one subprocess on 4 fake CPU devices (tests/per_shard_cases.py);
the single-device ones here."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from per_shard_cases import MOSAIC, TRITON, kernel_calls, pallas_calls
from scan_cases import FWD_TOL, GRAD_TOL, make_inputs
from train_cases import REPO, env


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("per_shard") / "result.json"
  e = env(devices=4)
  e["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "tests"), e["PYTHONPATH"]])
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "per_shard_cases.py"),
                         str(out)], env=e, cwd=REPO, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    return json.load(f)


def test_sharded_scan_equals_the_unsharded_one(four_devices):
  """Forward and every gradient under (data 4) and (data 2, fsdp 2) meshes (Auto axes; Explicit
  ones too, which jax.make_mesh makes by default) equal the call
  without a mesh: the whole arguments' gradients (A, D, delta_bias) are summed over shards."""
  assert len(four_devices["errors"]) == 6
  for key, errs in four_devices["errors"].items():
    print(key, errs)
    assert errs["y"] <= FWD_TOL[jnp.float32] and errs["last"] <= FWD_TOL[jnp.float32], key
    assert all(v <= GRAD_TOL[jnp.float32] for v in errs.values()), (key, errs)


def test_pallas_calls_sit_inside_shard_map(four_devices):
  for key, where in four_devices["jaxpr"].items():
    assert where == {"manual": 2, "outside": 0}, (key, where)  # the forward and the backward


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_exported_sharded_train_step_leaves_no_kernel_to_the_partitioner(four_devices, platform):
  """The real train step (steps.make_train_step, tiny preset, backend "auto") exported over 4
  devices: every Triton (CUDA) or Mosaic (TPU) call lies in a manual region."""
  for mesh in ("4x1", "2x2"):
    got = four_devices["export"][f"{platform}/{mesh}"]
    assert got["nr_devices"] == 4
    # 2 scans, fwd + bwd; on TPU also the memory read's Mosaic kernels (on CUDA it is XLA),
    # forward and backward (SS2D keeps the merged y, so the read is not recomputed)
    want = {"cuda": 4, "tpu": 6}[platform]
    assert got["outside"] == 0 and got["manual"] == want, (mesh, got)


def test_a_users_jit_under_set_mesh_runs_per_shard(four_devices):
  """README's recipe: `with jax.set_mesh(mesh)` around one's own jitted model (auto backend)."""
  got = four_devices["users_jit"]
  assert got["rel_err"] <= 1e-5, got
  # forward only, 2 blocks: 2 x 2 scans and 2 memory reads (Mosaic, counted on TPU)
  assert got["outside"] == 0 and got["manual"] == 6, got


def test_a_batch_the_mesh_does_not_divide_is_named(four_devices):
  msg = four_devices["odd_batch_error"]
  assert msg and "batch 6" in msg and "('data', 'fsdp')" in msg and "4 devices" in msg


def test_without_a_mesh_or_on_one_device_nothing_changes():
  inputs = make_inputs(1, batch=2, length=8, d_inner=8)
  f = lambda u: kernels.selective_scan(**{**inputs, "u": u}, backend="xla")
  plain = jax.make_jaxpr(f)(inputs["u"])
  with jax.set_mesh(jax.make_mesh((1, 1), ("data", "fsdp"))):
    one = jax.make_jaxpr(f)(inputs["u"])
    y = f(inputs["u"])
  assert "shard_map" not in str(plain) and "shard_map" not in str(one)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(f(inputs["u"])))


def test_kernel_call_finder_sees_calls_outside_a_manual_region():
  """Positive control for the export checks: a Mosaic call exported with no mesh is outside
  any manual region, and the jaxpr walker finds a bare pallas_call."""
  from kernels import pallas_tpu
  from jax.experimental.pallas import tpu as pltpu
  inputs = make_inputs(2, batch=2, length=16, d_inner=128, groups=1)
  args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in inputs.items()}
  scan = lambda kw: kernels.selective_scan(**kw, backend="pallas_tpu")
  text = jax.export.export(jax.jit(scan), platforms=["tpu"])(args).mlir_module()
  assert kernel_calls(text, [MOSAIC, TRITON]) == {MOSAIC: {"manual": 0, "outside": 1},
                                                  TRITON: {"manual": 0, "outside": 0}}
  interpreted = lambda kw: kernels.selective_scan(**kw, backend=lambda *a: pallas_tpu.selective_scan(
      *a, interpret=pltpu.InterpretParams()))
  assert pallas_calls(jax.make_jaxpr(interpreted)(inputs).jaxpr) == {"manual": 0, "outside": 1}
