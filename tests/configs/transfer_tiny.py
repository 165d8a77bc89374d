"""configs/transfer.py (arg DATASET,METHOD) and configs/vmamba_tiny.py:booster (arg "booster")
on a one-stage VMamba-T small enough to compile in seconds, for tests/test_transfer.py.
Per-run settings (data_dir, init_from, compile_cache) come as --config.key=value flags."""
import importlib.util
import os

import ml_collections

SMALL = dict(dims=(16,), depths=(2,))


def _config_file(name, arg):
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", name)
  spec = importlib.util.spec_from_file_location(name[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg):
  c = _config_file("vmamba_tiny.py", arg) if arg == "booster" else _config_file("transfer.py", arg)
  c.model_overrides = ml_collections.ConfigDict(SMALL)
  c.dtype = "float32"
  c.scan_backend = "xla"      # "auto" also traces the Pallas branches of other platforms
  c.drop_path_rate = 0.0
  if arg == "booster":        # the tiny archive's 3 of CIFAR-100's classes
    c.data.name, c.data.eval_split = "cifar100", "test"
  c.data.image_size = 32
  c.data.crop_pct = 1.0
  c.data.randaugment = ""
  c.data.mixup = c.data.cutmix = c.data.reprob = 0.0
  c.data.num_workers = 0
  c.batch_size = c.lr_base_batch = 8
  c.lr = 1e-2
  c.epochs = 2.0
  c.warmup_epochs = 0.0
  c.ema_decay = 0.0
  c.eval_every = 0.0           # at the end only
  c.eval_batch_size = 12
  c.log_every = 1
  c.checkpoint_every = 100000  # at the end only
  return c
