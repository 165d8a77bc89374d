"""VMamba-Tiny on ImageNet-1k, the recipe of b2.py; :booster for adaptor_vmamba_tiny.

python train.py --config=configs/vmamba_tiny.py:booster --config.init_from=DIR --workdir=...
(DIR from python -m adaptor_jax.convert.vmamba --checkpoint=... --model=vmamba_tiny --output=DIR)
"""
from adaptor_jax.training.config import vmamba_config


def get_config(arg=None):
  return vmamba_config("tiny", arg)
