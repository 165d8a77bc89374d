"""The VMamba UperNet importer and exporter (adaptor_jax/convert/upernet.py): the official key
inventory, exact round trips (params and BatchNorm statistics), an oracle of the imported heads,
the command line (class count from decode_head.conv_seg.bias; the output loads with load_model,
statistics included) and named errors.

tests/fixtures/upernet_vmamba_tiny_keys.json is the official inventory (key -> shape, in order):
the state dict of VMamba's UperNet-T as mmsegmentation 1.2.2 builds it from VMamba's config
segmentation/configs/vssm1/upernet_vssm_4xb4-160k_ade20k-512x512_tiny.py (150 classes;
MzeroMiko/VMamba at 2ed52ea, torch 2.14.1), written once by
  .venv/bin/python tests/parity_upernet.py --torch_site=/tmp/parity/lib/python3.11/site-packages \\
      --vmamba_git=/work/.mirror/MzeroMiko+VMamba/repo --write_fixture
which also checks the logits against that model (outside CI; see its docstring).
Everything else runs on a small UperNet (SMALL), built abstractly where it is only filled.
"""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convert_cases as cc
from adaptor_jax.convert import state_dict as sd
from adaptor_jax.convert import upernet as cu
from adaptor_jax.models import registry
from adaptor_jax.models.upernet import UperNet
from adaptor_jax.training import loader

SHAPES = cc.official_shapes("upernet_vmamba_tiny_keys.json")
PRESET = "upernet_vmamba_tiny"
SMALL = dict(dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), channels=16, aux_channels=8)


def official_shapes(model):
  """{key: shape} that cu.layout(model) gives, in its order (a counter: a scalar)."""
  variables = sd._variables(model)  # noqa: SLF001 - the params and BatchNorm statistics
  return {key: () if path is None else
          tuple(jax.eval_shape(to_theirs, variables[path].get_value()).shape)
          for key, path, (_, to_theirs) in cu.layout(model)}


def random_state_dict(shapes, seed=0):
  """Random official tensors; running variances positive, num_batches_tracked int64 (as
  torch's), at 160000 (an official checkpoint's count) or 0 (what the export writes)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if key.endswith("num_batches_tracked"):
      out[key] = np.array(160000 if seed % 2 else 0, np.int64)
    elif key.endswith("running_var"):
      out[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      out[key] = rng.standard_normal(shape).astype(np.float32)
  return out


def small(num_classes=5):
  return cc.abstract(PRESET, num_classes=num_classes, **SMALL)


def exported(state_dict):
  """What the export of an import of `state_dict` is: the same, num_batches_tracked int64 0."""
  return {k: np.zeros((), np.int64) if k.endswith("num_batches_tracked") else v
          for k, v in state_dict.items()}


def test_layout_is_the_official_upernet_vmamba_tiny_inventory():
  """Keys, order and shapes of the official UperNet-T; every param and statistic has one key."""
  model = cc.abstract(PRESET, num_classes=150)
  assert list(official_shapes(model).items()) == list(SHAPES.items())
  paths = [path for _, path, _ in cu.layout(model) if path is not None]
  assert len(set(paths)) == len(paths) == len(sd._variables(model))  # noqa: SLF001
  counters = [k for k, path, _ in cu.layout(model) if path is None]
  assert counters == [k for k in SHAPES if k.endswith("num_batches_tracked")]
  assert len(counters) == 13  # a BatchNorm in each ConvModule: 4 PPM, 1 + 3 + 3 + 1 UPer, 1 FCN


def test_round_trips_are_exact(tmp_path):
  """official -> ours -> official, in memory and through save / restore; the BatchNorm
  statistics land in the BatchStats (running_var in var), the count is written as int64 0."""
  model = small()
  state_dict = random_state_dict(official_shapes(model), seed=1)
  cu.from_state_dict(model, state_dict)
  bn = model.decode_head.fpn_bottleneck.bn
  assert isinstance(bn.var, nnx.BatchStat) and isinstance(bn.mean, nnx.BatchStat)
  np.testing.assert_array_equal(bn.var[...],
                                state_dict["decode_head.fpn_bottleneck.bn.running_var"])
  np.testing.assert_array_equal(bn.mean[...],
                                state_dict["decode_head.fpn_bottleneck.bn.running_mean"])
  want = exported(state_dict)
  got = cu.to_state_dict(model)
  cc.assert_same(got, want)
  assert got["auxiliary_head.convs.0.bn.num_batches_tracked"].dtype == np.int64
  cu.save(model, PRESET, tmp_path / "ckpt")
  cc.assert_same(cu.to_state_dict(cu.restore(tmp_path / "ckpt", **SMALL)), want)


def _conv_nchw(x, w, padding):
  """PyTorch's Conv2d (no bias): x (N, C, H, W), w (O, C, kh, kw), stride 1."""
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  kh, kw = w.shape[2:]
  h, wd = x.shape[2] - kh + 1, x.shape[3] - kw + 1
  return sum(np.einsum("nchw,oc->nohw", x[:, :, i:i + h, j:j + wd], w[:, :, i, j])
             for i in range(kh) for j in range(kw))


def test_imported_auxiliary_head_is_mmsegs_fcn_head():
  """In eval, our auxiliary head with imported weights computes mmseg's FCNHead (num_convs 1)
  on the official tensors: conv3x3 -> BatchNorm (running statistics, eps 1e-5) -> ReLU ->
  conv_seg (1x1 with bias), here in numpy, NCHW."""
  model = small(num_classes=3)
  state_dict = random_state_dict(official_shapes(model), seed=2)
  cu.from_state_dict(model, state_dict)
  model.eval()
  x = np.random.default_rng(3).standard_normal((2, 24, 5, 7)).astype(np.float32)
  p = lambda k: state_dict[f"auxiliary_head.{k}"].astype(np.float64)
  h = _conv_nchw(x.astype(np.float64), p("convs.0.conv.weight"), 1)
  c = lambda a: a[None, :, None, None]
  h = (h - c(p("convs.0.bn.running_mean"))) / np.sqrt(c(p("convs.0.bn.running_var")) + 1e-5)
  h = np.maximum(h * c(p("convs.0.bn.weight")) + c(p("convs.0.bn.bias")), 0)
  want = _conv_nchw(h, p("conv_seg.weight"), 0) + c(p("conv_seg.bias"))
  got = model.auxiliary_head(jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-4, atol=1e-4)


SMALL_CLI = f"""
import sys
from adaptor_jax.models import registry
create = registry.create_model
registry.create_model = lambda name, **kw: create(name, **{{**{SMALL!r}, **kw}})
from adaptor_jax.convert import state_dict, upernet
state_dict.cli(upernet)
"""


def test_command_line_import_then_export_of_a_small_upernet(tmp_path, monkeypatch):
  """`python -m adaptor_jax.convert.upernet` as is, on a small UperNet (create_model gives the
  preset SMALL's sizes, in the command's process and in this one): .npz in (7 classes, read
  from decode_head.conv_seg.bias), our checkpoint, which load_model reads with its BatchNorm
  statistics, in eval (a head's logits equal to the imported model's; the whole model's against
  the official one: tests/parity_upernet.py), and the export, equal to the input but for
  num_batches_tracked (0)."""
  model = small(num_classes=7)
  state_dict = random_state_dict(official_shapes(model), seed=3)

  def run(*args):
    done = subprocess.run([sys.executable, "-c", SMALL_CLI, *args], check=False,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
  np.savez(tmp_path / "in.npz", **state_dict)
  out = run(f"--checkpoint={tmp_path / 'in.npz'}", f"--model={PRESET}",
            f"--output={tmp_path / 'ours'}")
  assert f"{PRESET}, {len(state_dict)} tensors, 7 classes" in out
  run("--export", f"--input={tmp_path / 'ours'}", f"--checkpoint={tmp_path / 'out.npz'}")
  with np.load(tmp_path / "out.npz") as f:
    cc.assert_same({k: f[k] for k in state_dict}, exported(state_dict))
    assert sorted(f.files) == sorted(state_dict)

  create = registry.create_model
  monkeypatch.setattr(registry, "create_model", lambda name, **kw: create(name, **{**SMALL, **kw}))
  loaded, config = loader.load_model(tmp_path / "ours")
  assert isinstance(loaded, UperNet) and (config.model, config.num_classes) == (PRESET, 7)
  cc.assert_same(cu.to_state_dict(loaded), exported(state_dict))  # params and statistics
  cu.from_state_dict(model, state_dict)
  model.eval()
  x = jax.random.normal(jax.random.key(0), (2, 3, 4, 24))  # eval BatchNorm: the running stats
  np.testing.assert_array_equal(loaded.auxiliary_head(x), model.auxiliary_head(x))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("decode_head.fpn_convs.2.bn.running_var"),
     "missing keys ['decode_head.fpn_convs.2.bn.running_var']"),
    (lambda d: d.pop("auxiliary_head.convs.0.bn.num_batches_tracked"),
     "missing keys ['auxiliary_head.convs.0.bn.num_batches_tracked']"),
    (lambda d: d.update({"auxiliary_head.conv_cat.conv.weight": np.zeros((8, 32, 3, 3))}),
     "unexpected keys ['auxiliary_head.conv_cat.conv.weight']"),   # FCNHead concat_input=True
    (lambda d: d.update({"backbone.classifier.head.weight": np.zeros((1000, 32))}),
     "unexpected keys ['backbone.classifier.head.weight']"),      # a classifier, not a backbone
    (lambda d: d.update({"decode_head.conv_seg.weight": np.zeros((5, 8, 1, 1))}),
     "key 'decode_head.conv_seg.weight' has shape (5, 8, 1, 1)"),
    (lambda d: d.update({"decode_head.psp_modules.3.1.bn.running_mean": np.zeros((17,))}),
     "key 'decode_head.psp_modules.3.1.bn.running_mean' has shape (17,)"),
    (lambda d: d.update({"decode_head.bottleneck.bn.num_batches_tracked": np.zeros((1,))}),
     "key 'decode_head.bottleneck.bn.num_batches_tracked' has shape (1,)"),
])
def test_mismatches_name_the_key_in_one_line(change, message):
  model = small()
  state_dict = random_state_dict(official_shapes(model))
  change(state_dict)
  with pytest.raises(ValueError) as e:
    cu.from_state_dict(model, state_dict)
  assert isinstance(e.value, sd.CheckpointMismatch)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_a_backbone_with_adaptors_cannot_be_exported():
  with pytest.raises(sd.CheckpointMismatch, match="backbone has adaptors"):
    cu.check_export(cc.abstract(PRESET, num_classes=5, form="booster", **SMALL), "DIR")

