"""config.init_from (training/init_from.py): what is loaded, what keeps its init by design, the
named errors, and the booster started from a converted VMamba equal to it at step 0."""
import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import train_cases as tc
from adaptor_jax.convert import vmamba as cv
from adaptor_jax.models import registry
from adaptor_jax.training import config as config_lib, init_from, optimizer, sharding, steps

SMALL = dict(dims=(16,), depths=(1,))  # a one-stage VMamba-T (ssm_ratio 1)


def _model_shapes(name, num_classes=10, **overrides):
  model = nnx.eval_shape(lambda: registry.create_model(
      name, num_classes=num_classes, rngs=nnx.Rngs(0), **SMALL, **overrides))
  return tc.flat_shapes(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_plan_loads_matches_and_keeps_only_new_adaptors_and_head():
  saved = _model_shapes("vmamba_tiny", num_classes=1000)
  wanted = _model_shapes("adaptor_vmamba_tiny", num_classes=10)
  load, init = init_from.plan(saved, wanted, "booster")
  assert sorted(load + init) == sorted(wanted)
  assert sorted(load) == sorted(p for p in saved if not p.startswith("head/"))
  assert {p for p in init if not p.startswith("head/")} == {
      p for p in wanted if "adaptor_t" in p or "adaptor_s" in p}
  assert {"head/kernel", "head/bias"} <= set(init)
  # the same checkpoint into the parallel adaptor form: the same rule
  parallel = _model_shapes("vmamba_tiny", form="adaptor")
  assert sorted(sum(init_from.plan(saved, parallel, "adaptor"), [])) == sorted(parallel)


@pytest.mark.parametrize("saved_change,form,message", [
    (lambda s: s.pop("stages/0/blocks/0/op/in_proj/kernel"), "none",
     "absent from the checkpoint: stages/0/blocks/0/op/in_proj/kernel"),
    (lambda s: s.update({"stages/0/blocks/0/mlp/fc1/kernel": (16, 99)}), "none",
     "of another shape: stages/0/blocks/0/mlp/fc1/kernel (16, 99) vs the model's (16, 64)"),
    (lambda s: s.update({"extra/kernel": (3, 3)}), "none",
     "in the checkpoint with no place in the model: extra/kernel"),
])
def test_plan_names_what_does_not_fit(saved_change, form, message):
  saved = _model_shapes("vmamba_tiny")
  saved_change(saved)
  with pytest.raises(ValueError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)")):
    init_from.plan(saved, _model_shapes("vmamba_tiny"), form)


def test_plan_backbone_form_does_not_invent_adaptors():
  """Mamba-Adaptor-bX carries its adaptors at gamma 1: from a plain VMamba they would be new
  by accident, not by design."""
  absent = r"absent from the checkpoint: .*adaptor_s/convs/0/bias.*\(11 in all\)"
  with pytest.raises(ValueError, match=absent):
    init_from.plan(_model_shapes("vmamba_tiny"), _model_shapes("vmamba_tiny", form="backbone"),
                   "backbone")


def _config(**changes):
  c = config_lib.default_config()
  c.model = "adaptor_vmamba_tiny"
  c.model_overrides = ml_collections.ConfigDict(SMALL)
  c.dtype, c.scan_backend, c.num_classes = "float32", "xla", 10
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1))
  c.update(changes)
  return c


def _started(config, workdir):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  made = steps.make_net(config, config.num_classes)
  tx = optimizer.make(config, 10, trainable=made[2])
  net, state, shardings = steps.create(config, config.num_classes, mesh, tx, made)
  return net, init_from.apply(state, shardings, config, str(workdir))


@pytest.mark.parametrize("where", ["disk", "bucket"])
def test_booster_from_a_converted_vmamba_equals_it_at_step_0(where, tmp_path, request):
  """From the converter's output on a disk, or in a bucket (tests/gcs_server.py)."""
  converted, vmamba = tc.converted_vmamba(tmp_path, "converted", num_classes=10, **SMALL)
  if where == "bucket":
    converted = request.getfixturevalue("gcs").bucket("converted") + "/vmamba"
    cv.save(vmamba, "vmamba_tiny", converted)
  config = _config(init_from=str(converted))
  net, state = _started(config, tmp_path)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  want = np.asarray(vmamba(x))
  got = np.asarray(net.model(state["params"], train=False)(x))
  assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want)), np.max(np.abs(got - want))
  ema = np.asarray(net.model(state["ema"], train=False)(x))
  np.testing.assert_array_equal(ema, got)
  with open(tmp_path / "init_from.json") as f:
    report = json.load(f)
  kept = report["kept_at_init"]
  assert kept and all("adaptor_t" in p or "adaptor_s" in p for p in kept), kept
  assert report["loaded"] == len(tc.flat(state["params"])) - len(kept)


def test_upernet_from_a_converted_vmamba_has_its_backbone(tmp_path):
  """UperNet starts from a VMamba classifier: the backbone's params are the classifier's (the
  same stage features), the classifier's head is dropped, the heads keep their init."""
  four = dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1))
  converted, vmamba = tc.converted_vmamba(tmp_path, "converted", num_classes=10, **four)
  config = _config(init_from=str(converted), model="upernet_vmamba_tiny", task="segmentation",
                   num_classes=5, model_overrides=ml_collections.ConfigDict(
                       dict(four, channels=16, aux_channels=8)))
  net, state = _started(config, tmp_path)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  model = net.model(state["params"], train=False, stats=state["stats"])
  ref = registry.create_model("vmamba_tiny", num_classes=10, rngs=nnx.Rngs(0), **four)
  nnx.update(ref, nnx.state(vmamba, nnx.Param))  # the converted params in a concrete model
  ref.eval()
  for got, want in zip(model.backbone(x, return_features=True), ref(x, return_features=True)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with open(tmp_path / "init_from.json") as f:
    report = json.load(f)
  assert report["dropped"] == ["head/bias", "head/kernel", "head_norm/bias", "head_norm/scale"]
  kept = report["kept_at_init"]
  assert {p.split("/")[0] for p in kept} == {"outnorms", "decode_head", "auxiliary_head"}
  assert report["loaded"] == len(tc.flat(state["params"])) - len(kept)

def test_mismatched_checkpoint_stops_with_one_line_naming_the_params(tmp_path):
  converted, _ = tc.converted_vmamba(tmp_path, "wider", num_classes=10, dims=(24,), depths=(1,))
  with pytest.raises(init_from.InitFromError) as e:
    _started(_config(init_from=str(converted)), tmp_path)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"config.init_from={converted}: adaptor_vmamba_tiny (form booster)")
  assert "of another shape: " in message and "patch_embed/conv1/kernel" in message
  with pytest.raises(init_from.InitFromError, match="not a training workdir"):
    _started(_config(init_from=str(tmp_path / "nowhere")), tmp_path)


def test_transfer_configs_need_a_pretrained_start():
  for change in (dict(form="adaptor"), dict(form="none", train_only="head")):
    c = _config(model="vmamba_tiny", **change)
    with pytest.raises(ValueError, match="config.init_from: the backbone is frozen"):
      config_lib.validate(c)
    c.init_from = "/ckpts/vmamba_tiny"
    assert config_lib.validate(c) is c


def test_linear_probing_trains_only_the_classifier():
  made = steps.make_net(_config(model="vmamba_tiny", form="none", train_only="head"), 10)
  mask = tc.flat(made[2])
  assert sorted(k for k, t in mask.items() if t) == [
      "head/bias", "head/kernel", "head_norm/bias", "head_norm/scale"]
  counts = steps.param_counts(made[1], made[2])
  assert counts["trainable"] == 16 * 10 + 10 + 2 * 16
  assert counts["params"] == sum(int(np.prod(s)) for s in tc.flat_shapes(
      nnx.to_pure_dict(made[1])).values())


def test_upernet_from_a_converted_upernet_has_its_batch_stats(tmp_path):
  """A converted UperNet (official weights) gives its params and BatchNorm's running statistics:
  the started model's eval output equals the converted model's."""
  from adaptor_jax.convert import upernet as cu
  four = dict(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), channels=16, aux_channels=8)
  source = registry.create_model("upernet_vmamba_tiny", num_classes=5, rngs=nnx.Rngs(3), **four)
  stats = nnx.state(source, nnx.BatchStat)
  rng = np.random.default_rng(0)
  nnx.update(source, jax.tree.map(lambda a: jax.numpy.asarray(
      rng.uniform(0.5, 1.5, a.shape).astype(np.float32)), stats))
  cu.save(source, "upernet_vmamba_tiny", str(tmp_path / "converted"))
  config = _config(init_from=str(tmp_path / "converted"), model="upernet_vmamba_tiny",
                   task="segmentation", num_classes=5,
                   model_overrides=ml_collections.ConfigDict(four))
  net, state = _started(config, tmp_path)
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  source.eval()
  got = net.model(state["params"], train=False, stats=state["stats"])(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(source(x)), rtol=1e-6, atol=1e-6)
  with open(tmp_path / "init_from.json") as f:
    assert json.load(f)["batch_stats"] == str(tmp_path / "converted")
