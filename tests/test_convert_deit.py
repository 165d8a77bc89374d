"""The timm DeiT importer and exporter (adaptor_jax/convert/deit.py): timm's key inventory, exact
round trips, the command line (the class count from head.bias; the output loads with
load_model) and named errors.

tests/fixtures/deit_tiny_keys.json is timm's inventory (timm 1.0.31), written once with
  python -c "import json, timm; sd = timm.create_model('deit_tiny_patch16_224', \\
    pretrained=False).state_dict(); print('{\\n' + ',\\n'.join( \\
    f'{json.dumps(k)}: {list(v.shape)}' for k, v in sd.items()) + '\\n}')" \\
    > tests/fixtures/deit_tiny_keys.json
(Logits against timm's model on random weights were checked outside CI; see the README.)
"""
import numpy as np
import pytest

import convert_cases as cc
from adaptor_jax.convert import deit as cd
from adaptor_jax.models.deit import DeiT
from adaptor_jax.training import loader

SHAPES = cc.official_shapes("deit_tiny_keys.json")


def random_state_dict(seed=0):
  return cc.random_state_dict(SHAPES, seed)


def test_layout_is_timms_deit_tiny_inventory():
  cc.assert_layout_is(cd, cc.abstract("deit_tiny"), SHAPES)


def test_round_trips_are_exact(tmp_path):
  cc.assert_round_trips(cd, "deit_tiny", random_state_dict(), tmp_path / "ckpt")


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_command_line_import_then_export(where, tmp_path, request):
  """.npz in, our checkpoint (which load_model reads), .npz out: all exact; head from head.bias.
  On a disk, or all three in a bucket (the GCS server of tests/gcs_server.py)."""
  state_dict = random_state_dict(seed=1)
  state_dict["head.weight"] = state_dict["head.weight"][:7]
  state_dict["head.bias"] = state_dict["head.bias"][:7]
  root = tmp_path if where == "disk" else request.getfixturevalue("gcs").bucket("convert")
  ours = cc.command_line(cd, "deit_tiny", state_dict, root)
  model, config = loader.load_model(ours)
  assert isinstance(model, DeiT) and (config.model, config.num_classes) == ("deit_tiny", 7)
  cc.assert_same(cd.to_state_dict(model), state_dict)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("blocks.11.mlp.fc2.bias"), "missing keys ['blocks.11.mlp.fc2.bias']"),
    (lambda sd: sd.update(dist_token=np.zeros((1, 1, 192))), "unexpected keys ['dist_token']"),
    (lambda sd: sd.update(pos_embed=np.zeros((1, 577, 192))), "key 'pos_embed' has shape"),
    (lambda sd: sd.update(cls_token=np.zeros((192,))), "key 'cls_token' has shape (192,)"),
    (lambda sd: sd.update({"blocks.3.attn.qkv.weight": np.zeros((192, 576))}),
     "key 'blocks.3.attn.qkv.weight' has shape (192, 576)"),
    (lambda sd: sd.update({"head.weight": np.zeros((1000, 192, 2))}), "key 'head.weight'"),
])
def test_mismatches_name_the_key(change, message):
  state_dict = random_state_dict()
  change(state_dict)
  with pytest.raises(ValueError) as e:
    cd.from_state_dict(cc.abstract("deit_tiny"), state_dict)
  assert message in str(e.value) and "\n" not in str(e.value)


