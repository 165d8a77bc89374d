"""The paper's second and third usages end to end, as a user runs them (README "Transfer
learning"): a VMamba converted through the importer's .npz path, the booster started from it,
and each of configs/transfer.py's methods fine-tuned from it (share from the full run's
workdir) on a CIFAR-100 built from a tiny archive in the distributed format; a mismatched init_from fails in one named line; a
fine-tuned VMamba goes back to the official layout from its workdir."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import dataset_archives
import train_cases as tc
from adaptor_jax.convert import vmamba as cv
from adaptor_jax.data import catalog
from adaptor_jax.training import (config as config_lib, init_from, loader, optimizer, sharding,
                                  steps)

TINY = os.path.join(tc.REPO, "tests", "configs", "transfer_tiny.py")
SMALL = dict(dims=(16,), depths=(2,))
METHODS = ("linear", "adaptor", "share", "full")


def _train(tmp_path, arg, workdir, data_dir, init):
  cmd = [sys.executable, os.path.join(tc.REPO, "train.py"), f"--config={TINY}:{arg}",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
         f"--config.init_from={init}", "--config.compile_cache="]
  log = tmp_path / os.path.basename(workdir)
  code, _ = tc.run(cmd, str(log), env=tc.env())
  with open(f"{log}.err") as f:
    return code, f.read()


def _config(arg, data_dir, init):
  spec = importlib.util.spec_from_file_location("transfer_tiny", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.data.data_dir, c.init_from, c.num_classes = str(data_dir), str(init), 100
  return c


def _start_and_end(config, workdir):
  """(params the run started from, params of its final checkpoint, trainable mask), flat."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1)), jax.devices()[:1])
  made = steps.make_net(config, config.num_classes)
  tx = optimizer.make(config, 10, trainable=made[2])
  _, state, shardings = steps.create(config, config.num_classes, mesh, tx, made)
  os.makedirs(workdir / "replay", exist_ok=True)
  start = init_from.apply(state, shardings, config, str(workdir / "replay"))["params"]
  directory = loader.find(workdir, ema=False).params
  end = loader.load_params(directory, state["params"], shardings["params"])
  mask = tc.flat(made[2]) if made[2] is not None else {k: True for k in tc.flat(start)}
  return tc.flat(start), tc.flat(end), mask


FROM_WORKDIR = {"share": "full"}  # share starts from the full run's workdir, the others converted


def _init(tmp, vmamba, method):
  return tmp / FROM_WORKDIR[method] if method in FROM_WORKDIR else vmamba


@pytest.fixture(scope="session")
def runs(shared):
  """Every run, made once for all the session's workers: {name: (exit code, stderr)}, with the
  paths they used."""
  tmp = shared / "transfer"
  out = dict(tmp=tmp, data_dir=tmp / "tfds", vmamba=tmp / "vmamba")
  with tc.once(tmp) as first:
    if first:
      dataset_archives.write_cifar100(tmp / "cifar-100-python.tar.gz",
                                      np.random.default_rng(0),
                                      fine=((3, 57, 99) * 16, (3, 57, 99) * 4))
      catalog.build_cifar100(str(tmp / "cifar-100-python.tar.gz"), str(out["data_dir"]))
      tc.converted_vmamba(tmp, "vmamba", **SMALL)  # 1000 classes, as the official ones
      other, _ = tc.converted_vmamba(tmp, "vmamba_wider", seed=1, **dict(SMALL, dims=(24,)))
      done = {"booster": _train(tmp, "booster", tmp / "booster", out["data_dir"],
                                out["vmamba"])}
      for method in sorted(METHODS, key=lambda m: m in FROM_WORKDIR):  # their sources first
        done[method] = _train(tmp, f"cifar100,{method}", tmp / method, out["data_dir"],
                              _init(tmp, out["vmamba"], method))
      done["mismatch"] = _train(tmp, "cifar100,adaptor", tmp / "mismatch", out["data_dir"],
                                other)
      with open(tmp / "runs.json", "w") as f:
        json.dump(done, f)
  with open(tmp / "runs.json") as f:
    return dict(out, **json.load(f))


@pytest.mark.parametrize("method", ("booster",) + METHODS)
def test_each_method_trains_exactly_its_params_and_the_loss_falls(runs, method):
  code, err = runs[method]
  assert code == 0, err[-3000:]
  workdir = runs["tmp"] / method
  losses = [loss for _, loss in sorted(tc.train_losses(tc.read_metrics(workdir)).items())]
  assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
  arg = "booster" if method == "booster" else f"cifar100,{method}"
  init = _init(runs["tmp"], runs["vmamba"], method)
  start, end, mask = _start_and_end(_config(arg, runs["data_dir"], init), workdir)
  changed = {k for k in start if not np.array_equal(start[k], end[k])}
  assert changed == {k for k, t in mask.items() if t}, sorted(changed ^ {
      k for k, t in mask.items() if t})
  with open(workdir / "init_from.json") as f:
    kept = json.load(f)["kept_at_init"]
  adaptors = [k for k in start if "adaptor_t" in k or "adaptor_s" in k]
  new_head = [] if method in FROM_WORKDIR else ["head/bias", "head/kernel"]  # 100 classes there
  assert sorted(kept) == sorted(adaptors + new_head)
  with open(workdir / "params.json") as f:
    counts = json.load(f)
  assert counts["trainable"] == sum(start[k].size for k, t in mask.items() if t)


def test_a_mismatched_init_from_stops_in_one_named_line(runs):
  code, err = runs["mismatch"]
  assert code == 1
  last = err.strip().splitlines()[-1]
  assert "Traceback" not in err, err[-3000:]
  assert last.startswith("train.py: config.init_from=") and "of another shape: " in last, last
  assert "patch_embed/conv1/kernel" in last, last


def test_export_from_a_workdir_and_refusal_for_adaptors(runs, tmp_path):
  run = lambda *a: subprocess.run([sys.executable, "-m", "adaptor_jax.convert.vmamba", *a],
                                  capture_output=True, text=True, env=tc.env(), check=False)
  full = runs["tmp"] / "full"
  done = run("--export", f"--input={full}", f"--checkpoint={tmp_path / 'out.npz'}")
  assert done.returncode == 0, done.stderr[-3000:]
  config = _config("cifar100,full", runs["data_dir"], runs["vmamba"])
  _, end, _ = _start_and_end(config, full)
  model = nnx.eval_shape(lambda: steps.build_model(config, 100))
  with np.load(tmp_path / "out.npz") as out:
    assert sorted(out.files) == sorted(key for key, _, _ in cv.layout(model))
    for key, path, (_, to_theirs) in cv.layout(model):
      want = to_theirs(end["/".join(map(str, path))])
      np.testing.assert_array_equal(out[key], want, err_msg=key)
  refused = run("--export", f"--input={runs['tmp'] / 'adaptor'}",
                f"--checkpoint={tmp_path / 'no.npz'}")
  assert refused.returncode == 1
  assert refused.stderr.strip().splitlines()[-1].endswith(
      "the official VMamba layout has no place for them"), refused.stderr[-2000:]


@pytest.mark.parametrize("dataset", ("cifar100", "svhn", "food101"))
@pytest.mark.parametrize("method", METHODS)
def test_transfer_config_files_validate_and_need_init_from(dataset, method):
  spec = importlib.util.spec_from_file_location("transfer", os.path.join(tc.REPO, "configs",
                                                                         "transfer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"{dataset},{method}")
  if method != "full":  # the frozen backbones
    with pytest.raises(ValueError, match="config.init_from: the backbone is frozen"):
      config_lib.validate(c)
  c.init_from = "/ckpts/vmamba_tiny"
  assert config_lib.validate(c) is c
  assert c.data.hflip == (0.0 if dataset == "svhn" else 0.5)
  with pytest.raises(ValueError, match="want DATASET,METHOD"):
    module.get_config(f"{dataset}")
