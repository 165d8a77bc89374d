"""The VMamba checkpoint importer and exporter: the official key inventory, exact round trips and
clear errors. (Logits against the official PyTorch model were checked outside CI; see the README.)"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from adaptor_jax.convert import vmamba as cv
from adaptor_jax.models import registry

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "vmamba_tiny_keys.json")


def abstract(name):
  return nnx.eval_shape(lambda: registry.create_model(name, rngs=nnx.Rngs(0)))


def official_shapes():
  with open(FIXTURE) as f:
    return {k: tuple(v) for k, v in json.load(f).items()}


def random_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in official_shapes().items()}


def test_layout_is_the_official_vmamba_tiny_inventory():
  model = abstract("vmamba_tiny")
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  ours = {key: tuple(jax.eval_shape(to_theirs, params[path].get_value()).shape)
          for key, path, (_, to_theirs) in cv.layout(model)}
  assert list(ours) == list(official_shapes())  # same keys, same order
  assert ours == official_shapes()
  assert len(ours) == len(params)  # every param has exactly one official key


def test_round_trip_is_exact(tmp_path):
  state_dict = random_state_dict()
  model = abstract("vmamba_tiny")
  cv.from_state_dict(model, state_dict)
  back = cv.to_state_dict(model)
  assert list(back) == list(state_dict)
  for k in state_dict:
    np.testing.assert_array_equal(back[k], state_dict[k], err_msg=k)
  cv.save(model, "vmamba_tiny", tmp_path / "ckpt")
  again = cv.to_state_dict(cv.restore(tmp_path / "ckpt"))
  for k in state_dict:
    np.testing.assert_array_equal(again[k], state_dict[k], err_msg=k)


def test_command_line_import_then_export(tmp_path):
  state_dict = random_state_dict(seed=1)
  np.savez(tmp_path / "in.npz", **state_dict)
  run = lambda *a: subprocess.run([sys.executable, "-m", "adaptor_jax.convert.vmamba", *a],
                                  check=True, capture_output=True, text=True)
  run(f"--checkpoint={tmp_path / 'in.npz'}", "--model=vmamba_tiny", f"--output={tmp_path / 'ours'}")
  run("--export", f"--input={tmp_path / 'ours'}", f"--checkpoint={tmp_path / 'out.npz'}")
  with np.load(tmp_path / "out.npz") as out:
    assert sorted(out.files) == sorted(state_dict)
    for k in state_dict:
      np.testing.assert_array_equal(out[k], state_dict[k], err_msg=k)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("layers.2.blocks.7.op.A_logs"), "layers.2.blocks.7.op.A_logs"),
    (lambda sd: sd.update({"layers.0.blocks.0.op.x_proj_bias": np.zeros(8)}), "x_proj_bias"),
    (lambda sd: sd.update({"layers.1.blocks.0.op.dt_projs_weight": np.zeros((4, 192, 7))}),
     "layers.1.blocks.0.op.dt_projs_weight"),
])
def test_mismatches_name_the_key(change, message):
  state_dict = random_state_dict()
  change(state_dict)
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    cv.from_state_dict(abstract("vmamba_tiny"), state_dict)


def test_booster_keeps_its_adaptors_and_cannot_be_exported():
  model = abstract("adaptor_vmamba_tiny")
  cv.from_state_dict(model, random_state_dict())
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    filled = isinstance(var.get_value(), jax.Array)
    assert filled != ("adaptor_t" in path or "adaptor_s" in path), path
  with pytest.raises(ValueError, match="adaptor params"):
    cv.to_state_dict(model)
