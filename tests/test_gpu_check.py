"""What a lent GPU runs, run on the CPU at tiny shapes: benchmarks/gpu_check.py's read check
(memory_read and learned_read against their references, every gradient, fp32 and bf16) passes
with the xla backend a GPU's "auto" picks and fails a wrong one; gpu_check refuses a CPU; and
benchmarks/adaptor_cost.py's GPU path (built, timed one model after the other, its ratios)
runs on a one-stage model."""
import os
import sys

import jax
import ml_collections
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import adaptor_cost  # noqa: E402
import gpu_check  # noqa: E402
import kernels  # noqa: E402

GRADS = {"memory_read": {"dh", "dpos", "dweight", "dgamma", "dscale"},
         "learned_read": {"dh", "dw", "db", "dgamma", "dscale"}}


def test_read_check_passes_with_the_gpus_backend():
  rows = gpu_check.check_read("xla", {"L37": (37, 4)}, batch=1)
  assert [(r["op"], r["dtype"]) for r in rows] == [
      (op, dtype) for op in GRADS for dtype in ("float32", "bfloat16")]
  for row in rows:
    assert set(row["errors"]) == {"out"} | GRADS[row["op"]]
    assert row["ok"], row


def test_read_check_fails_a_wrong_read():
  args = gpu_check.read_inputs(0, "memory_read", 1, 37, 4, jax.numpy.float32)
  errs, ok = gpu_check.read_errors("memory_read", lambda *a: kernels.read.xla(*a) * 1.001, args)
  assert not ok and errs["out"] > gpu_check.FWD_TOL[jax.numpy.float32]


def test_refuses_a_device_that_is_not_a_gpu(monkeypatch, tmp_path):
  monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # main() sets it: undone after
  monkeypatch.setattr(sys, "argv", ["gpu_check.py", f"--out_dir={tmp_path}", "--steps=read"])
  with pytest.raises(SystemExit, match="the default device is cpu, not a GPU"):
    gpu_check.main()
  monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--steps=read,nonsense"])
  with pytest.raises(SystemExit):  # argparse's error: exit status 2
    gpu_check.main()


@pytest.fixture
def tiny_models(monkeypatch):
  """adaptor_cost's presets as one stage of one block (dim 8) on 16x16 images; the GPU step at
  batch 2 in float32."""
  make = adaptor_cost.make_config

  def tiny(name, dtype):
    c = make(name, dtype)
    c.model_overrides = ml_collections.ConfigDict(dict(dims=(8,), depths=(1,)))
    c.scan_backend, c.data.image_size, c.data.reprob = "xla", 16, 0.0
    return c

  monkeypatch.setattr(adaptor_cost, "make_config", tiny)
  adaptor_cost.FLAGS(["adaptor_cost.py", "--gpu_batch=2", "--gpu_dtype=float32", "--iters=1"])
  yield
  adaptor_cost.FLAGS.unparse_flags()


@pytest.mark.usefixtures("tiny_models")
def test_adaptor_cost_gpu_path_runs_on_the_cpu(capsys):
  names = ["mamba_adaptor_b1+none", "mamba_adaptor_b1"]
  rows = adaptor_cost.measure_gpu(names, platform="cpu")
  for row in rows.values():
    assert row["batch"] == 2 and row["dtype"] == "float32"
    assert row["step_s"] > 0 and row["images_per_s"] == 2 / row["step_s"]
    assert row["compiled_gib"] > 0 and row["peak_gib"] is None  # the CPU reports no peak
  vs = adaptor_cost.ratios("gpu", *(rows[n] for n in names))
  assert set(vs) == {"step_s", "images_per_s", "compiled_gib", "temporaries_mb_per_image"}
  assert vs["compiled_gib"] > 1  # the adaptors' parameters and activations
  adaptor_cost.print_row("gpu", names[1], rows[names[1]], vs)
  assert "peak_gib         -" in capsys.readouterr().out
