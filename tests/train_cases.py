"""Cases for tests/test_training.py, test_init_from.py and test_transfer.py: tiny training
configs, a converted VMamba with random weights, norm-based comparisons, subprocess
environments, and the 8-device script run in its own process (XLA_FLAGS must be set before jax
is imported):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_cases.py sharded \
      OUT_DIR DATA_DIR COMPILE_CACHE

It trains 2 steps from the same initial state on the same two batches (16 images each) in
four ways (RUNS): on one device, on one device with grad_accum=2, on (data=8, fsdp=1) and on
(data=2, fsdp=4) over the 8 fake CPU devices, and writes OUT_DIR/sharded.npz (initial and final
params, EMA, the logits below), OUT_DIR/sharded.json (losses, gradient norms, where every param,
EMA and Adam moment lives), a checkpoint of the (2, 4) run in OUT_DIR/workdir, and the logits
of a fixed input under the EMA and the raw params of that run, computed on the 8 devices.
"""
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "configs", "tiny.py")  # for train.py runs
# name: (mesh axes, devices, grad_accum)
RUNS = {"one": (dict(data=1, fsdp=1), 1, 1), "accum2": (dict(data=1, fsdp=1), 1, 2),
        "data8": (dict(data=8, fsdp=1), 8, 1), "fsdp4": (dict(data=2, fsdp=4), 8, 1)}


def tiny_config(data_dir="", compile_cache="", **overrides):
  """A Mamba-Adaptor-b1 of one 1-block stage (dim 8) in float32 on 16x16 digits, with on-device
  mixup/cutmix (random erasing off: it adds ~40% to the train step's compile time; a single
  block has drop path 0 anyway); no warm-up, so the first steps take full-size updates."""
  import ml_collections  # noqa: PLC0415
  from adaptor_jax.training import config as config_lib  # noqa: PLC0415
  c = config_lib.default_config()
  c.model = "mamba_adaptor_b1"
  c.model_overrides = ml_collections.ConfigDict(dict(dims=(8,), depths=(1,)))
  c.drop_path_rate = 0.0
  c.dtype = "float32"
  c.scan_backend = "xla"  # "auto" also traces the Pallas kernels of the other platforms
  c.data.name = "digits"
  c.data.data_dir = str(data_dir)
  c.data.image_size = 16
  c.data.crop_pct = 1.0
  c.data.randaugment = ""
  c.data.num_workers = 0
  c.data.reprob = 0.0
  c.num_classes = 10
  c.batch_size = 16
  c.lr_base_batch = 16
  c.lr = 1e-3
  c.epochs = 2.0
  c.warmup_epochs = 0.0
  c.ema_decay = 0.5  # the EMA differs clearly from the params after 2 steps
  c.eval_batch_size = 40
  c.log_every = 1
  c.eval_every = 0.0
  c.checkpoint_every = 100000
  c.compile_cache = str(compile_cache)
  c.update(overrides)
  return c


@contextlib.contextmanager
def once(directory):
  """Yields True to the first process (of a session's xdist workers) that gets here, which then
  makes what `directory` is to hold; the others wait for it, then get False."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    first = not os.path.exists(os.path.join(directory, ".done"))
    yield first
    if first:
      open(os.path.join(directory, ".done"), "w").close()


def converted_vmamba(directory, name, *, num_classes=1000, seed=0, **overrides):
  """A VMamba-T of `overrides` with random weights written as an official .npz and imported
  through the converter's .npz path into directory/name; returns (that path, the model)."""
  import jax  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from adaptor_jax.convert import vmamba as cv  # noqa: PLC0415
  from adaptor_jax.models import registry  # noqa: PLC0415
  model = nnx.eval_shape(lambda: registry.create_model(
      "vmamba_tiny", num_classes=num_classes, rngs=nnx.Rngs(0), **overrides))
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  rng = np.random.default_rng(seed)
  official = {key: 0.2 * rng.standard_normal(
      jax.eval_shape(to_theirs, params[path].get_value()).shape).astype(np.float32)
      for key, path, (_, to_theirs) in cv.layout(model)}
  npz = os.path.join(directory, f"{name}.npz")
  np.savez(npz, **official)
  cv.from_state_dict(model, cv.read_checkpoint(npz))
  cv.save(model, "vmamba_tiny", os.path.join(directory, name))
  return os.path.join(directory, name), model


def flat(tree, prefix=""):
  """{"a/b/c": numpy array} of a pytree of arrays (device arrays are fetched)."""
  import jax  # noqa: PLC0415
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[prefix + _name(path)] = np.asarray(jax.device_get(leaf))
  return out


def _name(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat_shapes(tree):
  """{"a/b/c": shape} of a pytree of arrays or ShapeDtypeStructs."""
  import jax  # noqa: PLC0415
  return {_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def rel(x, ref):
  """||x - ref|| / ||ref|| (Frobenius, float64); the plain ||x|| where ref is exactly zero."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  scale = np.linalg.norm(ref)
  return float(np.linalg.norm(x - ref) / (scale if scale > 0 else 1.0))


def tree_rel(x, ref):
  """rel() over all leaves at once (x, ref: dicts of arrays with the same keys)."""
  assert sorted(x) == sorted(ref), set(x) ^ set(ref)
  keys = sorted(ref)
  return rel(np.concatenate([np.ravel(x[k]) for k in keys]),
             np.concatenate([np.ravel(ref[k]) for k in keys]))


def env(devices=None, optimize=False):
  """Environment of a subprocess: CPU only, `devices` fake host devices (None: one), and unless
  `optimize` XLA's cheap compile mode (as in-process tests, see conftest.py) without the CPU
  fusion emitters (compiles ~40% faster; runs slower: for programs that run a few steps)."""
  e = dict(os.environ, JAX_PLATFORMS="cpu")
  e.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  flags = [f"--xla_force_host_platform_device_count={devices}"] if devices else []
  if not optimize:
    e["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    flags.append("--xla_cpu_use_fusion_emitters=false")
  e["XLA_FLAGS"] = " ".join(flags)
  e["PYTHONPATH"] = os.pathsep.join([REPO, e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return e


def without_libtpu(directory):
  """The environment of the Quick start's install, which brings no libtpu: this process's
  environment with a `libtpu` that does not import ahead of the installed one on PYTHONPATH
  (written into `directory`), and without the variables importing libtpu set here."""
  shadow = os.path.join(directory, "no_libtpu", "libtpu")
  os.makedirs(shadow, exist_ok=True)
  with open(os.path.join(shadow, "__init__.py"), "w") as f:
    f.write("raise ImportError('libtpu is not installed')\n")
  e = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(shadow), REPO]))
  for name in ("JAX_PLATFORMS", "TPU_LIBRARY_PATH"):
    e.pop(name, None)
  return e


def train_cmd(workdir, data_dir, compile_cache, *flags):
  """`python train.py` on tests/configs/tiny.py (the demo recipe on a tiny model)."""
  return [sys.executable, os.path.join(REPO, "train.py"), f"--config={TINY_CONFIG}",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.compile_cache={compile_cache}", *flags]


def run(cmd, log_path, timeout=600, **kwargs):
  """Runs `cmd` with stdout to log_path + ".out" and stderr to log_path + ".err"; returns
  (returncode, stdout text). A timeout kills it and fails."""
  with open(f"{log_path}.out", "w") as out, open(f"{log_path}.err", "w") as err:
    proc = subprocess.run(cmd, stdout=out, stderr=err, cwd=REPO, timeout=timeout, check=False,
                          **kwargs)
  with open(f"{log_path}.out") as f:
    return proc.returncode, f.read()


def tail(path, n=3000):
  with open(path) as f:
    return f.read()[-n:]


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_losses(metrics):
  return {m["step"]: m["train/loss"] for m in metrics if "train/loss" in m}


# ------------------------------------------------------------------------------------------------
# The 8-device script.


def fixed_input(config, n=4):
  """Normalised float images (n, S, S, 3) from fixed uint8 noise."""
  from adaptor_jax.data import augment  # noqa: PLC0415
  size = config.data.image_size
  images = np.random.default_rng(7).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return np.asarray(augment.eval_batch(images, config.data))


def sharded(out_dir, data_dir, compile_cache):
  import jax  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415
  from adaptor_jax.data import pipeline  # noqa: PLC0415
  from adaptor_jax.training import checkpoint, loop, optimizer, sharding, steps  # noqa: PLC0415

  assert jax.device_count() == 8, jax.devices()
  config = loop.setup(tiny_config(data_dir, compile_cache))
  num_classes = config.num_classes
  steps_per_epoch = pipeline.num_examples(config.data, config.data.train_split) // config.batch_size
  _, _, trainable = steps.make_net(config, num_classes)
  tx = optimizer.make(config, steps_per_epoch, trainable)
  data_iter = pipeline.train_iterator(config.data, batch_size=config.batch_size, seed=config.seed)
  batches = [next(data_iter) for _ in range(2)]
  arrays, info = {}, {}
  seconds = {"setup": time.time() - START}
  for name, (axes, n_devices, grad_accum) in RUNS.items():
    t = time.time()
    mesh = sharding.make_mesh(ml_collections.ConfigDict(axes), devices=jax.devices()[:n_devices])
    net, state, shardings = steps.create(config, num_classes, mesh, tx)
    arrays.update(flat(state["params"], f"{name}/init/"))
    seconds[f"{name}/create"] = time.time() - t
    t = time.time()
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.grad_accum = grad_accum
    train_step = steps.make_train_step(net, tx, run_config, num_classes, shardings, mesh)
    losses, grad_norms = [], []
    for batch in batches:
      state, metrics = train_step(state, sharding.global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
      grad_norms.append(float(metrics["grad_norm"]))
    seconds[f"{name}/train"] = time.time() - t
    arrays.update(flat(state["params"], f"{name}/final/"))
    arrays.update(flat(state["ema"], f"{name}/ema/"))
    # Where each param, its EMA and its first Adam moment live: spec and one shard's shape.
    adam_mu = [s for s in jax.tree.leaves(state["opt"], is_leaf=lambda s: hasattr(s, "mu"))
               if hasattr(s, "mu")]
    placed = {"params": state["params"], "ema": state["ema"]}
    if adam_mu:
      placed["mu"] = adam_mu[0].mu
    where = {}
    for kind, tree in placed.items():
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = kind + "/" + _name(path)
        where[key] = dict(spec=[str(a) for a in leaf.sharding.spec], shape=list(leaf.shape),
                          shard=list(leaf.addressable_shards[0].data.shape),
                          devices=len(leaf.sharding.device_set))
    info[name] = dict(losses=losses, grad_norms=grad_norms, mesh=dict(mesh.shape),
                      step=int(state["step"]), where=where)
    if name == "fsdp4":  # a checkpoint saved from 8 devices, and what it must load as
      t = time.time()
      workdir = os.path.join(out_dir, "workdir")
      mngr = checkpoint.manager(workdir, config)
      checkpoint.save(mngr, state, data_iter, config, pipeline.class_names(config.data))
      mngr.wait_until_finished()
      mngr.close()
      x = fixed_input(config)
      forward = jax.jit(lambda params, x: net.model(params, train=False)(x))
      arrays["logits/ema"] = np.asarray(forward(state["ema"], x))
      arrays["logits/raw"] = np.asarray(forward(state["params"], x))
      arrays["logits/x"] = x
      seconds["save_and_logits"] = time.time() - t
  info["seconds"] = seconds
  np.savez(os.path.join(out_dir, "sharded.npz"), **arrays)
  with open(os.path.join(out_dir, "sharded.json"), "w") as f:
    json.dump(info, f)


START = time.time()

if __name__ == "__main__":
  if sys.argv[1] == "sharded":
    sharded(*sys.argv[2:5])
  else:
    raise SystemExit(f"unknown case {sys.argv[1]!r}")
