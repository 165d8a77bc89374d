"""DeiT-Ti/S/B on ImageNet-1k with DeiT's recipe (Touvron et al. 2021; its main.py defaults):
configs/deit.py:tiny|small|base.

python train.py --config=configs/deit.py:tiny --workdir=DIR [--config.data.data_dir=...]
python train.py --config=configs/deit.py:small --config.init_from=DIR --workdir=...
(DIR from python -m adaptor_jax.convert.deit --checkpoint=... --model=deit_small --output=DIR)

What differs from the VMamba recipe (training/config.py documents every knob): AdamW at 5e-4 per
512 images (DeiT's 1e-3 at its batch of 1024), warm-up and final lr 1e-6 / 1e-5 at 1024, 5
warm-up epochs, no gradient clipping, EMA 0.99996, drop path 0.1 (the presets'). The data recipe
is the default one, which is DeiT's: RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
mixup 0.8 / cutmix 1.0, label smoothing 0.1, bicubic crops, eval at crop_pct 0.875. DeiT's
repeated augmentation (3 repeats per batch) is not in our pipeline.
"""
import ml_collections

from adaptor_jax.training.config import default_config

SIZES = ("tiny", "small", "base")


def get_config(arg=None):
  if arg not in SIZES:
    raise ValueError(f"configs/deit.py:{arg}: the variants are {', '.join(SIZES)}")
  c = default_config()
  c.model = f"deit_{arg}"         # drop path 0.1 (the preset's)
  # attention: "fused" (jax.nn.dot_product_attention) or "plain" (einsums); models/deit.py
  c.model_overrides = ml_collections.ConfigDict(dict(attention="fused"))
  c.lr = 5e-4
  c.lr_base_batch = 512
  c.warmup_lr = 5e-7              # 1e-6 at batch 1024 (DeiT does not scale it)
  c.min_lr = 5e-6                 # 1e-5 at batch 1024 (nor this)
  c.warmup_epochs = 5.0
  c.grad_clip = 0.0
  c.ema_decay = 0.99996
  c.data.num_workers = 32         # ~150 images/s per core (benchmarks/input_pipeline.py)
  return c
