"""VMamba-Small on ImageNet-1k, the recipe of b2.py; :booster for adaptor_vmamba_small.

python train.py --config=configs/vmamba_small.py:booster --config.init_from=DIR --workdir=...
(DIR from python -m adaptor_jax.convert.vmamba --checkpoint=... --model=vmamba_small --output=DIR)
"""
from adaptor_jax.training.config import vmamba_config


def get_config(arg=None):
  return vmamba_config("small", arg)
