"""The demo: a small Mamba-Adaptor on scikit-learn's handwritten digits (built on first use).

python train.py --config=configs/demo.py --workdir=/tmp/demo   (>= 95% top-1 in minutes on a CPU)
"""
import ml_collections

from adaptor_jax.training.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.model = "mamba_adaptor_b1"  # backbone form: Adaptor-T and Adaptor-S in every block
  c.model_overrides = ml_collections.ConfigDict(dict(dims=(32, 64, 128), depths=(1, 2, 1)))
  c.drop_path_rate = 0.0
  c.dtype = "float32"
  c.data.name = "digits"        # 8x8 digits, 1437 train / 360 validation
  c.data.image_size = 16
  c.data.crop_pct = 1.0
  c.data.scale = (0.6, 1.0)
  c.data.ratio = (0.8, 1.25)
  c.data.hflip = 0.0            # a flipped digit is another digit
  c.data.randaugment = ""
  c.data.interpolation = "bilinear"
  c.data.reprob = 0.0
  c.data.mixup = 0.0
  c.data.cutmix = 0.0
  c.data.mean = (0.5, 0.5, 0.5)
  c.data.std = (0.5, 0.5, 0.5)
  c.data.num_workers = 0
  c.batch_size = 64
  c.epochs = 8.0
  c.warmup_epochs = 1.0
  c.lr = 2e-3
  c.lr_base_batch = 64
  c.ema_decay = 0.95
  c.eval_every = 4.0
  c.eval_batch_size = 120
  c.log_every = 20
  c.checkpoint_every = 100
  c.keep = 2
  return c
