"""Mamba-Adaptor-b2 on ImageNet-1k, the paper's recipe (VMamba / Swin): 300 epochs, AdamW 1e-3 per
1024 images, cosine with 20 warm-up epochs, EMA, bf16 compute. Every knob: training/config.py.

python train.py --config=configs/b2.py --workdir=DIR [--config.data.data_dir=...]
"""
from adaptor_jax.training.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.model = "mamba_adaptor_b2"  # drop path 0.2 (the preset's)
  c.data.num_workers = 32       # ~150 images/s per core (benchmarks/input_pipeline.py)
  return c
