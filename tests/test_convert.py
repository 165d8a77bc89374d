"""The VMamba checkpoint importer and exporter: the official key inventory, exact round trips and
clear errors. (Logits against the official PyTorch model were checked outside CI; see the README.)"""
import jax
import numpy as np
import pytest
from flax import nnx

import convert_cases as cc
from adaptor_jax.convert import vmamba as cv

SHAPES = cc.official_shapes("vmamba_tiny_keys.json")
abstract = cc.abstract


def random_state_dict(seed=0):
  return cc.random_state_dict(SHAPES, seed)


def test_layout_is_the_official_vmamba_tiny_inventory():
  cc.assert_layout_is(cv, abstract("vmamba_tiny"), SHAPES)


def test_round_trip_is_exact(tmp_path):
  cc.assert_round_trips(cv, "vmamba_tiny", random_state_dict(), tmp_path / "ckpt")


def test_command_line_import_then_export(tmp_path):
  cc.command_line(cv, "vmamba_tiny", random_state_dict(seed=1), tmp_path)


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


def test_an_npz_of_pickled_objects_is_refused_unloaded(tmp_path):
  """An .npz whose array is a pickled object (which could run code when loaded) is refused in
  one line; nothing of it is unpickled."""
  from adaptor_jax.convert import state_dict as sd  # noqa: PLC0415
  path = tmp_path / "vssm.npz"
  np.savez(path, weights=np.array([{"a": 1}], dtype=object))
  with pytest.raises(sd.CheckpointUnreadable, match="holds pickled objects, which are never loaded"):
    sd.read_checkpoint(str(path))
