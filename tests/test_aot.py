"""adaptor_jax/training/aot.py and the mesh on TPU: the real train step compiled by the real TPU
compiler (libtpu, deviceless) for 4-chip slices, and the topology-aware mesh.

Compiles use a tiny preset (one stage of one block, 32x32 images): a full-size train step takes
minutes to compile on a 2-core machine (benchmarks/tpu_fit.py does those)."""
import re
import types

import jax
import ml_collections
import numpy as np
import pytest

from adaptor_jax.training import aot, sharding
from train_cases import tiny_config

PER_CHIP = 8
pytestmark = pytest.mark.usefixtures("full_optimizations")


def tpu_tiny_config(mesh):
  """tests' tiny Mamba-Adaptor as the TPU recipe runs it: bf16, backend "auto" (Mosaic)."""
  c = tiny_config(num_classes=10)
  c.dtype = "bfloat16"
  c.scan_backend = "auto"
  c.data.image_size = 32
  c.mesh = ml_collections.ConfigDict(dict(data=mesh[0], fsdp=mesh[1]))
  return c


def kernel_batches(compiled, name):
  """The batch (leading dim of the first result) of every compiled call of kernel `name`."""
  return [int(re.search(r"\[(\d+),", line).group(1)) for line in aot.custom_calls(compiled, name)]


@pytest.mark.parametrize("mesh", [(4, 1), (2, 2)], ids=["data4", "data2_fsdp2"])
def test_sharded_train_step_compiles_for_a_4_chip_v5e(mesh):
  """The real train step compiles for v5e:2x2 (it failed before the kernels ran per shard:
  "Mosaic kernels cannot be automatically partitioned"); every Mosaic call in the optimized
  program scans one chip's slice of the batch; with fsdp 2 the params arrive split."""
  config = tpu_tiny_config(mesh)
  compiled, state = aot.compile_train_step(config, aot.topology_devices("v5e", (2, 2)),
                                           PER_CHIP)
  fwd, bwd = (kernel_batches(compiled, f"selective_scan_{k}") for k in ("fwd", "bwd"))
  print(f"mesh {mesh}: forward calls {fwd}, backward calls {bwd}")
  assert len(fwd) == 2 and len(bwd) == 2  # two scans (rows/columns), forward and backward
  assert set(fwd) == set(bwd) == {PER_CHIP}
  whole, per_chip = aot.state_bytes(state)
  assert (per_chip < 0.6 * whole) == (mesh[1] > 1), (whole, per_chip)  # fsdp 2 halves most
  compiled_shardings = jax.tree.leaves(compiled.input_shardings[0][0])
  assert any("fsdp" in str(s.spec) for s in compiled_shardings) == (mesh[1] > 1)
  mem = aot.memory(compiled)
  assert 0 < mem["hbm"] < 2**30 and mem["arguments"] > 0


def test_sharded_eval_step_compiles_for_a_4_chip_v5e():
  compiled = aot.compile_eval_step(tpu_tiny_config((2, 2)), aot.topology_devices("v5e", (2, 2)),
                                   PER_CHIP)
  assert set(kernel_batches(compiled, "selective_scan_fwd")) == {PER_CHIP}
  assert not aot.custom_calls(compiled, "selective_scan_bwd")


def test_segmentation_train_step_compiles_for_a_4_chip_v5e():
  """A tiny UperNet on the b1 form (BatchNorm over the global batch, both heads, the pixel loss)
  compiles for v5e:2x2 with (data 2, fsdp 2); every Mosaic scan takes one chip's images."""
  c = tpu_tiny_config((2, 2))
  c.task, c.model, c.num_classes = "segmentation", "upernet_b1", 5
  c.model_overrides = ml_collections.ConfigDict(dict(
      dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), channels=16, aux_channels=8))
  compiled, state = aot.compile_train_step(c, aot.topology_devices("v5e", (2, 2)), 2)
  assert set(kernel_batches(compiled, "selective_scan_fwd")) == {2}
  assert "stats" in state and jax.tree.leaves(state["stats"])
  assert 0 < aot.memory(compiled)["hbm"] < 2**30

def collectives(compiled):
  """Counts of the gathering collectives in the optimized program (async forms included)."""
  text = compiled.as_text()
  return {op: len(re.findall(rf"= \S+ {op}(-start)?\(", text)) for op in ("all-gather", "all-to-all")}


def test_grad_accumulation_keeps_micro_batches_on_every_chip():
  """grad_accum=2 on (data 4): each micro-batch is spread over all 4 chips, so every Mosaic
  call scans half a chip's batch and no activation is gathered or exchanged between chips
  (micro-batches cut as contiguous blocks of the batch lived on 2 chips each: all-gathers
  and an all-to-all)."""
  config = tpu_tiny_config((4, 1))
  config.grad_accum = 2
  compiled, _ = aot.compile_train_step(config, aot.topology_devices("v5e", (2, 2)), PER_CHIP)
  assert set(kernel_batches(compiled, "selective_scan_fwd")) == {PER_CHIP // 2}
  assert collectives(compiled) == {"all-gather": 0, "all-to-all": 0}


def test_fit_report_adds_up():
  compiled, _ = aot.compile_train_step(tpu_tiny_config((1, 1)),
                                       aot.topology_devices("v5e", (1, 1)), PER_CHIP)
  mem, cost = aot.memory(compiled), aot.cost(compiled)
  row = aot.report(compiled, "v5e", PER_CHIP)
  assert mem["hbm"] == mem["arguments"] + mem["temporaries"] + mem["outputs"] - mem["aliases"]
  assert row["hbm_gib"] == pytest.approx(mem["hbm"] / 2**30)
  assert row["fits"] and row["hbm_capacity_gib"] == 16
  flop_bound = 197e12 / (cost["flops"] / PER_CHIP)
  byte_bound = 819e9 / (cost["bytes"] / PER_CHIP)
  assert row["roofline_images_per_s"] == pytest.approx(min(flop_bound, byte_bound))
  assert mem["aliases"] > 0  # the donated state is updated in place


def test_compile_needs_num_classes_and_a_good_config():
  c = tpu_tiny_config((1, 1))
  c.num_classes = -1
  with pytest.raises(ValueError, match="config.num_classes"):
    aot.compile_train_step(c, aot.topology_devices("v5e", (1, 1)), PER_CHIP)
  c.num_classes, c.remat = 10, "most"
  with pytest.raises(ValueError, match="config.remat"):
    aot.compile_train_step(c, aot.topology_devices("v5e", (1, 1)), PER_CHIP)


def test_chips_and_slices():
  assert [aot.CHIPS["v5e"].slice_shape(n) for n in (1, 4, 8, 256)] == [
      (1, 1), (2, 2), (4, 2), (16, 16)]
  assert aot.CHIPS["v5p"].slice_shape(8) == (2, 2, 2)
  for chip in aot.CHIPS:
    one = aot.topology_devices(chip, aot.CHIPS[chip].slice_shape(1))
    four = aot.topology_devices(chip, aot.CHIPS[chip].slice_shape(4))
    assert len(one) == 1 and len(four) == 4  # one device per chip (megacore on v4 and v5p)
  with pytest.raises(ValueError, match="TPU topology v5e:3x3"):
    aot.topology_devices("v5e", (3, 3))


def _ring(devices):
  """True when consecutive devices (and the last and the first) are torus neighbours."""
  coords = [np.asarray(d.coords) for d in devices]
  return all(np.abs(a - b).sum() == 1 for a, b in zip(coords, coords[1:] + coords[:1]))


def test_tpu_mesh_follows_the_torus():
  """make_mesh on TPU devices is create_device_mesh's layout: a 16-chip fsdp axis on a 4x4 v5e
  is a ring of neighbouring chips, where the devices in id order are not."""
  devices = aot.topology_devices("v5e", (4, 4))
  for data, fsdp in ((1, 16), (4, 4), (2, 8)):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)), devices)
    assert mesh.devices.shape == (data, fsdp)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
  ring = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=16)), devices)
  assert _ring(list(ring.devices[0]))
  assert not _ring(sorted(devices, key=lambda d: d.id))


def test_other_devices_are_reshaped_in_the_order_given():
  devices = [types.SimpleNamespace(platform="gpu", id=i) for i in (3, 1, 2, 0)]
  grid = sharding.device_grid((2, 2), devices)
  assert [[d.id for d in row] for row in grid] == [[3, 1], [2, 0]]


