"""Transfer learning from a pretrained VMamba (the paper's Table 4): configs/transfer.py:DATASET,METHOD.

python train.py --config=configs/transfer.py:cifar100,adaptor --config.init_from=DIR --workdir=...
  DATASET  cifar100 | svhn (TFDS svhn_cropped) | food101, built by adaptor_jax.data.builders
  METHOD   linear   the classifier only (head_norm, head)
           adaptor  the parallel Mamba-Adaptor of every block (K = 8), plus the classifier
           share    the same with one adaptor per stage
           full     everything
--config.model=vmamba_small|vmamba_base with a matching init_from (DIR from
python -m adaptor_jax.convert.vmamba, or a run's workdir); the head starts new (another number
of classes). The recipe is ours where the paper is silent: 224x224, 30 epochs (3 warm-up),
AdamW at 1e-3 per 256 images (full: 1e-4), the ImageNet augmentation (RandAugment,
mixup/cutmix, random erasing; no flips for SVHN's digits), no EMA (a few thousand steps).
Every other knob: training/config.py.
"""
from adaptor_jax.training.config import default_config

# dataset -> (TFDS name, evaluation split, horizontal flip probability)
DATASETS = {"cifar100": ("cifar100", "test", 0.5), "svhn": ("svhn_cropped", "test", 0.0),
            "food101": ("food101", "validation", 0.5)}
METHODS = ("linear", "adaptor", "share", "full")


def get_config(arg=None):
  dataset, _, method = (arg or "").partition(",")
  if dataset not in DATASETS or method not in METHODS:
    raise ValueError(f"configs/transfer.py:{arg}: want DATASET,METHOD with DATASET one of "
                     f"{sorted(DATASETS)} and METHOD one of {METHODS}")
  c = default_config()
  c.model = "vmamba_tiny"
  c.form = "adaptor" if method in ("adaptor", "share") else "none"
  c.share_adaptor = method == "share"
  c.train_only = "head" if method == "linear" else ""
  c.drop_path_rate = 0.1 if method == "full" else 0.0  # frozen blocks: no stochastic depth
  c.data.name, c.data.eval_split, c.data.hflip = DATASETS[dataset]
  c.data.num_workers = 16
  c.batch_size = 256
  c.lr_base_batch = 256
  c.lr = 1e-4 if method == "full" else 1e-3
  c.epochs = 30.0
  c.warmup_epochs = 3.0
  c.ema_decay = 0.0
  c.eval_every = 5.0
  c.checkpoint_every = 1000
  return c
