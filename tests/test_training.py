"""Training: train steps on 8 fake CPU devices (data and FSDP meshes) and with gradient
accumulation against one device, a checkpoint saved from 8 devices loaded on one, the demo
recipe learning (and eval.py agreeing), SIGTERM and resume against an uninterrupted run (two
processes against one: test_buckets.py); and the cheap parts: config validation, the weight-decay mask, frozen
params, the schedule, and the adaptor form's train step.

Runs that need fresh processes (XLA_FLAGS, jax.distributed, signals) are subprocesses sharing a
persistent XLA compilation cache; each serves several checks of one test.
"""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaptor_jax
import train_cases as tc
from adaptor_jax.models import registry
from adaptor_jax.training import config as config_lib, optimizer, sharding, steps

TINY_STEPS = 132  # tests/configs/tiny.py: 3 epochs of 1437 // 32 = 44 steps


# ------------------------------------------------------------------------------------------------
# Shared by the xdist workers of a session: the digits dataset (built once, under builders' file
# lock) and a persistent XLA compilation cache (identical programs compile once across the
# subprocesses). Each expensive subprocess belongs to one test, so no worker ever waits on
# another's.


@pytest.fixture(scope="session")
def data_dir(shared):
  from adaptor_jax.data import builders  # noqa: PLC0415
  builders.build_digits(str(shared / "tfds"))
  return shared / "tfds"


@pytest.fixture(scope="session")
def compile_cache(shared):
  path = shared / "xla_cache"
  path.mkdir(exist_ok=True)
  return path


def _section(arrays, prefix):
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def _update(arrays, run):
  """{param: final - initial} of one run of the 8-device script."""
  init = _section(arrays, f"{run}/init/")
  return {k: v - init[k] for k, v in _section(arrays, f"{run}/final/").items()}


# ------------------------------------------------------------------------------------------------
# 8 devices against one (one subprocess, checked four ways).


def test_training_on_8_devices(tmp_path, data_dir, compile_cache):
  """tests/train_cases.py `sharded` with 8 fake CPU devices: 2 steps from the same state on the
  same 2 batches of 16 (mixup/cutmix on), on 1 device, 1 device with grad_accum=2,
  (data=8, fsdp=1) and (data=2, fsdp=4); a checkpoint of the last. Checks, in turn:
  (1) each sharded run equals the 1-device run, (2) FSDP really splits params, moments and EMA,
  (3) grad_accum=2 equals grad_accum=1, (4) the checkpoint loads on this process's one device.
  Errors are ||x - ref|| / ||ref||, float32."""
  code, _ = tc.run([sys.executable, os.path.join(tc.REPO, "tests", "train_cases.py"),
                    "sharded", str(tmp_path), str(data_dir), str(compile_cache)],
                   str(tmp_path / "log"), env=tc.env(devices=8))
  assert code == 0, tc.tail(tmp_path / "log.err")
  with open(tmp_path / "sharded.json") as f:
    info = json.load(f)
  arrays = dict(np.load(tmp_path / "sharded.npz"))
  print("seconds:", info["seconds"])
  for run in ("data8", "fsdp4"):
    _check_same_step(info, arrays, run)
  _check_fsdp_placement(info)
  _check_same_step(info, arrays, "accum2")
  _check_checkpoint_loads_on_one_device(tmp_path / "workdir", arrays)


def _check_same_step(info, arrays, run):
  """`run` matches the 1-device run: the same initial params bit for bit (made under jit in
  their shardings from the same seed), and after 2 steps the same losses and gradient norms,
  params, EMA and updates (final - initial params: Adam-normalised, the most sensitive
  quantity) to float32 reduction-order noise. Seen (sharded and grad_accum=2 alike): losses
  <= 2e-7, params and EMA <= 4e-7 per tensor, the update <= 9e-7 over all params and <= 2e-6
  for the worst tensor (up to 3e-5 with XLA's CPU fusion emitters on)."""
  axes, _, _ = tc.RUNS[run]
  assert info[run]["mesh"] == axes and info[run]["step"] == info["one"]["step"] == 2
  for key in ("losses", "grad_norms"):
    np.testing.assert_allclose(info[run][key], info["one"][key], rtol=1e-5, err_msg=run)
  init, ref_init = _section(arrays, f"{run}/init/"), _section(arrays, "one/init/")
  assert init.keys() == ref_init.keys() and len(init) > 30
  for k in ref_init:
    np.testing.assert_array_equal(init[k], ref_init[k], err_msg=f"{run} {k}")
  for kind in ("final", "ema"):
    got, ref = _section(arrays, f"{run}/{kind}/"), _section(arrays, f"one/{kind}/")
    worst = max((tc.rel(got[k], ref[k]), k) for k in ref)
    print(f"{run} {kind}: worst tensor {worst}")
    assert worst[0] < 1e-5, (run, kind, worst)
  update, ref_update = _update(arrays, run), _update(arrays, "one")
  assert tc.rel(np.concatenate([np.ravel(v) for v in ref_update.values()]), 0) > 0  # it moved
  overall = tc.tree_rel(update, ref_update)
  worst = max((tc.rel(update[k], ref_update[k]), k) for k in ref_update)
  print(f"{run} update: all params {overall:.2e}, worst tensor {worst}")
  assert overall < 1e-5, (run, overall)
  assert worst[0] < 1e-4, (run, worst)


def _check_fsdp_placement(info):
  """On (data=2, fsdp=4) params split over fsdp hold a quarter per device, and their first Adam
  moment and EMA are split the same way; on (data=8, fsdp=1) everything is replicated."""
  where = info["fsdp4"]["where"]
  split = {k for k, w in where.items() if k.startswith("params/") and "fsdp" in w["spec"]}
  assert "params/head/kernel" in split and len(split) > 10, sorted(split)
  for k in split:
    w = where[k]
    axis = w["spec"].index("fsdp")
    assert w["shard"][axis] * 4 == w["shape"][axis], (k, w)
    assert np.prod(w["shard"]) < np.prod(w["shape"]), (k, w)
    name = k[len("params/"):]
    for kind in ("ema", "mu"):
      assert where[f"{kind}/{name}"]["spec"] == w["spec"], (kind, name)
  for k, w in info["data8"]["where"].items():
    assert "fsdp" not in w["spec"] and w["shard"] == w["shape"] and w["devices"] == 8, (k, w)


def _check_checkpoint_loads_on_one_device(workdir, arrays):
  """load_model on the workdir checkpointed from 8 devices with FSDP: every array on this
  process's one device, the params bit-equal to the saved EMA (which lags the raw params), and
  the logits of a fixed input those the 8-device process computed from its sharded EMA (seen:
  ~1e-7; EMA against raw logits: ~7e-2). ema=False loads the raw params."""
  model, config = adaptor_jax.load_model(workdir)
  device = jax.local_devices()[0]
  for leaf in jax.tree.leaves(nnx.state(model)):
    assert leaf.devices() == {device}
  loaded = tc.flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  ema, raw = _section(arrays, "fsdp4/ema/"), _section(arrays, "fsdp4/final/")
  assert loaded.keys() == ema.keys()
  for k in ema:
    np.testing.assert_array_equal(loaded[k], ema[k], err_msg=k)
  init = _section(arrays, "fsdp4/init/")
  moved = lambda params: {k: v - init[k] for k, v in params.items()}
  assert tc.tree_rel(moved(loaded), moved(raw)) > 0.1  # the EMA (decay 0.5) lags the params
  assert config.num_classes == 10 and tuple(config.model_overrides.dims) == (8,)
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, arrays["logits/x"])
  print(f"logits: loaded vs saved EMA {tc.rel(logits, arrays['logits/ema']):.2e}, "
        f"EMA vs raw {tc.rel(arrays['logits/raw'], arrays['logits/ema']):.2e}")
  assert tc.rel(logits, arrays["logits/ema"]) < 1e-5
  assert tc.rel(arrays["logits/raw"], arrays["logits/ema"]) > 1e-2
  raw_model, _ = adaptor_jax.load_model(workdir, ema=False)
  loaded_raw = tc.flat(nnx.to_pure_dict(nnx.state(raw_model, nnx.Param)))
  for k in raw:
    np.testing.assert_array_equal(loaded_raw[k], raw[k], err_msg=k)


# ------------------------------------------------------------------------------------------------
# Config validation.


def _load_config_file(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(tc.REPO, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name,arg", [
    ("demo.py", None), ("b1.py", None), ("b2.py", None), ("vmamba_tiny.py", None),
    ("vmamba_tiny.py", "booster"), ("vmamba_small.py", None), ("vmamba_base.py", "booster"),
    ("seg_demo.py", None), ("upernet_ade20k.py", None), ("upernet_ade20k.py", "b1"),
    ("upernet_ade20k.py", "vmamba_base")])
def test_config_files_validate(name, arg):
  config = _load_config_file(name, arg)
  assert config_lib.validate(config) is config


def test_upernet_ade20k_schedule_is_in_iterations():
  """VMamba's mmseg recipe: 1,500 iterations of linear warm-up from 1e-6 x 6e-5, poly (power 1)
  to 0 at 160k, whatever the training split's size (steps_per_epoch=1000)."""
  config = _load_config_file("upernet_ade20k.py", "vmamba_tiny")
  assert config.model == "upernet_vmamba_tiny" and config.batch_size == 16
  lr = optimizer.schedule(config, config.steps_per_epoch)
  assert round(config.epochs * config.steps_per_epoch) == 160_000
  assert float(lr(0)) == pytest.approx(6e-11, abs=1e-11)  # float32: an ulp of 6e-5 is 7e-12
  assert float(lr(1500)) == pytest.approx(6e-5)
  assert float(lr(1500 + (160_000 - 1500) // 2)) == pytest.approx(3e-5, rel=1e-4)
  assert float(lr(160_000)) == 0.0
  with pytest.raises(ValueError, match="the variants are b1, b2"):
    _load_config_file("upernet_ade20k.py", "b3")


def _set(path, value):
  def change(c):
    *parents, key = path.split(".")
    for p in parents:
      c = c[p]
    if key in c:
      c[key] = value
    else:
      setattr(c, key, value)  # a new key: ConfigDict accepts it, validate must not
  return change


@pytest.mark.parametrize("change,key", [
    (_set("lr_schedule", "cosine"), "lr_schedule"),
    (_set("schedule", "step"), "schedule"),
    (_set("model", "resnet50"), "model"),
    (_set("form", "sideways"), "form"),
    (_set("share_adaptor", True), "share_adaptor"),  # only with form="adaptor"
    (_set("dtype", "float16"), "dtype"),
    (_set("batch_size", 0), "batch_size"),
    (_set("steps_per_epoch", 0), "steps_per_epoch"),
    (_set("data.eval_ratios", (1.0, 0.0)), "data.eval_ratios"),
    (_set("grad_accum", 3), "grad_accum"),  # does not divide 1024
    (_set("lr", 0.0), "lr"),
    (_set("warmup_epochs", 300.0), "warmup_epochs"),
    (_set("ema_decay", 1.0), "ema_decay"),
    (_set("drop_path_rate", 1.0), "drop_path_rate"),
    (_set("num_classes", 0), "num_classes"),
    (_set("mesh.data", 0), "mesh.data"),
    (_set("mesh.model", 2), "mesh.model"),
    (_set("data.decoder", "pil"), "data.decoder"),
    (_set("data.name", ""), "data.name"),
    (_set("data.max_bad_fraction", 1.5), "data.max_bad_fraction"),
    (_set("data.bad_window", 0), "data.bad_window"),
    (_set("data.image_size", 4), "data.image_size"),
    (_set("data.crop_pct", 1.5), "data.crop_pct"),
    (_set("data.scale", (0.5, 1.5)), "data.scale"),
    (_set("data.ratio", (2.0, 1.0)), "data.ratio"),
    (_set("data.hflip", 2.0), "data.hflip"),
    (_set("data.mixup", -1.0), "data.mixup"),
    (_set("data.interpolation", "nearest"), "data.interpolation"),
    (_set("data.randaugment", "rand-q3"), "data.randaugment"),
    (_set("data.std", (0.5, 0.0, 0.5)), "data.mean"),
])
def test_validate_names_the_bad_key(change, key):
  config = config_lib.default_config()
  change(config)
  with pytest.raises(ValueError, match=rf"^config\.{re.escape(key)}: "):
    config_lib.validate(config)


def test_validate_accepts_randaugment_off():
  config = config_lib.default_config()
  config.data.randaugment = ""
  assert config_lib.validate(config) is config and config.data.randaugment == ""


def test_train_cli_rejects_a_bad_value_before_compute(tmp_path):
  code, _ = tc.run(tc.train_cmd(tmp_path / "workdir", tmp_path / "tfds", tmp_path / "cache",
                                "--config.data.crop_pct=2.0"), str(tmp_path / "log"),
                   env=tc.env(), timeout=120)
  assert code != 0
  assert "config.data.crop_pct: must be in (0, 1]" in (tmp_path / "log.err").read_text()
  assert not (tmp_path / "workdir").exists() and not (tmp_path / "tfds").exists()


# ------------------------------------------------------------------------------------------------
# train.py: the demo recipe that learns, eval.py, SIGTERM and resume.


def test_train_learns_evaluates_and_resumes_exactly(tmp_path, data_dir, compile_cache):
  """`python train.py` on tests/configs/tiny.py (the demo recipe, a one-stage model, 132 steps):
  (1) it learns far above chance, and eval.py agrees with its final evaluation; (2) the same
  command SIGTERMed and rerun logs exactly the same losses."""
  ref = tmp_path / "uninterrupted"
  code, _ = tc.run(tc.train_cmd(ref, data_dir, compile_cache), str(tmp_path / "ref"),
                   env=tc.env(optimize=True))
  assert code == 0, tc.tail(tmp_path / "ref.err")
  ref_metrics = tc.read_metrics(ref)
  _check_learns_and_eval_cli_agrees(ref, ref_metrics, tmp_path)
  _check_sigterm_then_resume(tmp_path / "resumed", ref_metrics, data_dir, compile_cache, tmp_path)


def _check_learns_and_eval_cli_agrees(workdir, metrics, tmp_path):
  """The final EMA top-1 on the 360 validation digits is far above chance (0.1; seen: 0.889),
  the loss fell, and `python eval.py --workdir` prints a JSON line last whose top-1 (EMA) and
  raw top-1 are the training run's final evaluation, exactly."""
  final = [m for m in metrics if "eval/top1" in m]
  assert [m["step"] for m in final] == [TINY_STEPS]
  final = final[-1]
  print("final eval:", final)
  assert final["eval/top1"] >= 0.5 and final["eval/n"] == 360, final
  losses = tc.train_losses(metrics)
  assert sorted(losses) == list(range(1, TINY_STEPS + 1))
  first, last = np.mean([losses[s] for s in range(1, 11)]), np.mean(
      [losses[s] for s in range(TINY_STEPS - 9, TINY_STEPS + 1)])
  assert last < 0.7 * first, (first, last)
  code, out = tc.run([sys.executable, os.path.join(tc.REPO, "eval.py"), f"--workdir={workdir}"],
                     str(tmp_path / "eval"), env=tc.env(optimize=True))
  assert code == 0, tc.tail(tmp_path / "eval.err")
  result = json.loads(out.strip().splitlines()[-1])
  assert result["top1"] == final["eval/top1"] and result["raw_top1"] == final["eval/raw_top1"]
  assert result["ema_top1"] == result["top1"] and result["n"] == 360


def _check_sigterm_then_resume(workdir, ref_metrics, data_dir, compile_cache, tmp_path):
  """SIGTERM to train.py once it logged 2 steps: it saves a checkpoint at the step it reached
  and exits 0; the same command again resumes there. The logged losses of steps 1..N, each
  logged once, and the final evaluation equal the uninterrupted run's exactly: same machine,
  same compiled programs (from the shared cache), a bit-exact restored state, and data order
  and randomness that depend only on (seed, step), so any difference is a bug, not rounding."""
  cmd = tc.train_cmd(workdir, data_dir, compile_cache)
  metrics_file = workdir / "metrics.jsonl"
  with open(tmp_path / "1.out", "w") as out, open(tmp_path / "1.err", "w") as err:
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=tc.REPO, env=tc.env(optimize=True))
    try:
      deadline = time.time() + 300
      while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and metrics_file.read_text().count("\n") >= 2:
          break
        time.sleep(0.02)
      assert proc.poll() is None, tc.tail(tmp_path / "1.err")
      proc.send_signal(signal.SIGTERM)
      assert proc.wait(timeout=120) == 0, tc.tail(tmp_path / "1.err")
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  stopped = re.search(r"stopping at step (\d+) on a termination signal",
                      (tmp_path / "1.out").read_text())
  assert stopped, tc.tail(tmp_path / "1.out")
  stop = int(stopped.group(1))
  print("stopped at step", stop)
  assert 2 <= stop < TINY_STEPS
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(stop)]
  assert max(tc.train_losses(tc.read_metrics(workdir))) == stop

  code, out = tc.run(cmd, str(tmp_path / "2"), env=tc.env(optimize=True))
  assert code == 0, tc.tail(tmp_path / "2.err")
  assert f"from step {stop}" in out
  metrics = tc.read_metrics(workdir)
  assert [m["step"] for m in metrics if "train/loss" in m] == list(range(1, TINY_STEPS + 1))
  assert tc.train_losses(metrics) == tc.train_losses(ref_metrics)  # exact
  evals = [(m["step"], m["eval/top1"], m["eval/raw_top1"]) for m in metrics if "eval/top1" in m]
  assert evals == [(m["step"], m["eval/top1"], m["eval/raw_top1"])
                   for m in ref_metrics if "eval/top1" in m]


# ------------------------------------------------------------------------------------------------
# Optimizer: decay mask, frozen params, schedule.


def _abstract_params(name, **overrides):
  model = nnx.eval_shape(lambda: registry.create_model(name, num_classes=10, rngs=nnx.Rngs(0),
                                                       **overrides))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


NO_DECAY = ("bias", "scale", "A_log", "A_b_log", "D", "D_b", "dt_bias", "gamma", "phi_c_bias",
            "phi_p_bias", "cls_token", "pos_embed")
DECAY = ("kernel", "x_proj", "dt_proj", "phi_p", "phi_c")


@pytest.mark.parametrize("name,overrides", [
    ("mamba_adaptor_b1", dict(dims=(8, 16), depths=(1, 1))),
    ("vim_tiny", dict(embed_dim=16, depth=2)),
])
def test_decay_mask(name, overrides):
  """No decay on biases, norm scales, A_log/A_b_log, D/D_b, dt_bias, the adaptors' gamma and
  phi biases, tokens and every 1-D param; decay on kernels (linear, conv), x_proj, dt_proj and
  the adaptors' phi_p / phi_c, whatever their rank."""
  params = _abstract_params(name, **overrides)
  mask = tc.flat(registry.decay_mask(params))
  shapes = tc.flat_shapes(params)
  seen = set()
  for path, decays in mask.items():
    leaf = path.split("/")[-1]
    if leaf in NO_DECAY or len(shapes[path]) == 1:
      assert not decays, path
      seen.add(leaf)
    elif leaf in DECAY or leaf == "weight":  # Vim's conv1d weight (4, D)
      assert decays, path
      seen.add(leaf)
    else:
      raise AssertionError(f"{path}: not covered by this test")
  if name == "vim_tiny":
    assert {"A_b_log", "D_b", "cls_token", "pos_embed", "weight"} <= seen
  else:
    assert {"A_log", "D", "dt_bias", "gamma", "phi_c_bias", "phi_p_bias", "scale", "x_proj",
            "dt_proj", "phi_p", "phi_c", "kernel"} <= seen
    assert len(shapes["stages/0/blocks/0/op/A_log"]) == 3  # the rule is by name, not rank


def _opt_config(**overrides):
  c = config_lib.default_config()
  c.update(dict(batch_size=256, lr_base_batch=1024, lr=1e-3, warmup_lr=1e-6, min_lr=1e-5,
                epochs=5.0, warmup_epochs=1.0, weight_decay=0.1, grad_clip=0.0), **overrides)
  return c


def test_optimizer_decays_masked_params_and_freezes_untrainable():
  """One AdamW step with zero gradients: only decayed params move, by lr * wd * p; a frozen
  param stays bit-identical even with a large gradient."""
  c = _opt_config(warmup_epochs=0.0)
  params = {"w": jnp.full((3, 4), 2.0), "b": jnp.full((4,), 2.0), "gamma": jnp.full((2, 4), 2.0),
            "frozen": jnp.full((3, 4), 2.0)}
  grads = dict(jax.tree.map(jnp.zeros_like, params), frozen=jnp.full((3, 4), 1e3))
  trainable = {"w": True, "b": True, "gamma": True, "frozen": False}
  tx = optimizer.make(c, steps_per_epoch=10, trainable=trainable)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  lr = 1e-3 * 256 / 1024
  np.testing.assert_allclose(new["w"], 2.0 * (1 - lr * 0.1), rtol=1e-6)
  for k in ("b", "gamma", "frozen"):
    np.testing.assert_array_equal(new[k], params[k], err_msg=k)


def test_schedule_endpoints_with_linear_scaling():
  """Rates scaled by batch_size / lr_base_batch = 1/4: warmup_lr at step 0, linear to lr at the
  end of the warm-up epoch, cosine to half way at the middle of the rest, min_lr at the end."""
  sched = optimizer.schedule(_opt_config(), steps_per_epoch=10)
  s = 0.25
  expected = {0: 1e-6 * s, 5: (1e-6 + 1e-3) / 2 * s, 10: 1e-3 * s, 30: (1e-3 + 1e-5) / 2 * s,
              50: 1e-5 * s, 60: 1e-5 * s}
  for step, value in expected.items():
    np.testing.assert_allclose(float(sched(step)), value, rtol=1e-5, err_msg=str(step))



def test_poly_schedule_is_linear_after_the_warm_up():
  """schedule="poly" (mmseg's PolyLR, power 1): the same warm-up, then linear from lr to min_lr
  over the remaining steps."""
  sched = optimizer.schedule(_opt_config(schedule="poly"), steps_per_epoch=10)
  s = 0.25
  expected = {0: 1e-6 * s, 5: (1e-6 + 1e-3) / 2 * s, 10: 1e-3 * s, 30: (1e-3 + 1e-5) / 2 * s,
              40: (1e-3 + 3 * 1e-5) / 4 * s, 50: 1e-5 * s, 60: 1e-5 * s}
  for step, value in expected.items():
    np.testing.assert_allclose(float(sched(step)), value, rtol=1e-5, err_msg=str(step))

# ------------------------------------------------------------------------------------------------
# In-process train steps on one device.


def _batch(n, size, seed=0):
  rng = np.random.default_rng(seed)
  return dict(image=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
              label=rng.integers(0, 10, (n,), dtype=np.int32))


def _one_step(config, batch):
  """(initial params, params after one step, metrics, trainable mask) on a 1-device mesh."""
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  _, _, trainable = steps.make_net(config, 10)
  tx = optimizer.make(config, 10, trainable)
  net, state, shardings = steps.create(config, 10, mesh, tx)
  init = tc.flat(state["params"])
  train_step = steps.make_train_step(net, tx, config, 10, shardings, mesh)
  state, metrics = train_step(state, sharding.global_batch(batch, mesh))
  return init, tc.flat(state["params"]), jax.device_get(metrics), trainable


def test_adaptor_form_train_step_freezes_the_backbone():
  """form="adaptor" on VMamba through steps.create and the jitted train step (optax
  multi_transform, whose state has no slots for frozen params): after a step, weight decay on,
  every frozen param is bit-identical; the head and the adaptors' gamma moved (the
  zero-initialised branch opens)."""
  config = tc.tiny_config(model="vmamba_tiny", form="adaptor")
  config.data.update(mixup=0.0, cutmix=0.0)  # a shorter compile; not what this test is about
  init, after, metrics, trainable = _one_step(config, _batch(16, 16))
  trainable = tc.flat(trainable)
  assert trainable.keys() == init.keys()
  frozen = [k for k, t in trainable.items() if not t]
  trains = [k for k, t in trainable.items() if t]
  assert any("in_proj" in k for k in frozen) and any("adaptor_t" in k for k in trains)
  for k in trains:
    assert re.search(r"adaptor_[ts]/|^head/|^head_norm/", k), k
  for k in frozen:
    np.testing.assert_array_equal(after[k], init[k], err_msg=k)
  moved = {k for k in trains if not np.array_equal(after[k], init[k])}
  assert {"head/kernel", "head/bias"} <= moved
  assert any(k.endswith("adaptor_t/gamma") for k in moved), sorted(moved)
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
