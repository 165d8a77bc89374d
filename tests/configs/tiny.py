"""The demo recipe (configs/demo.py) on a Mamba-Adaptor small enough to compile in seconds, for
tests/test_training.py. Per-run settings (data_dir, compile_cache, max_steps...) come as
--config.key=value flags."""
import importlib.util
import os

import ml_collections


def _demo():
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py")
  spec = importlib.util.spec_from_file_location("demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  del arg
  c = _demo()
  c.model_overrides = ml_collections.ConfigDict(dict(dims=(32,), depths=(1,)))
  c.scan_backend = "xla"       # "auto" also traces the Pallas branches of other platforms
  c.batch_size = 32
  c.lr_base_batch = 32
  c.lr = 1e-2
  c.epochs = 3.0
  c.warmup_epochs = 0.5
  c.ema_decay = 0.9
  c.eval_every = 0.0          # at the end only
  c.log_every = 1
  c.checkpoint_every = 100000  # at the end (or on SIGTERM) only
  return c
