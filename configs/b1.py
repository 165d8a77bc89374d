"""Mamba-Adaptor-b1 on ImageNet-1k, the paper's recipe (see b2.py); drop path 0.1 (the preset's)."""
from adaptor_jax.training.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.model = "mamba_adaptor_b1"
  c.data.num_workers = 32
  return c
