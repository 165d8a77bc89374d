"""The segmentation demo: a small UperNet on Mamba-Adaptor-b1's shape, on scikit-learn's digits
placed on 64x64 canvases (`seg_digits`: a class per digit's ink, background a class; built on
first use).

python train.py --config=configs/seg_demo.py --workdir=/tmp/seg_demo    (8 min on 2 cores: 55% mIoU)
python eval.py --workdir=/tmp/seg_demo                                   # mIoU, mAcc, aAcc
"""
import ml_collections

from adaptor_jax.training.config import default_config


def get_config(arg=None):
  del arg
  c = default_config()
  c.task = "segmentation"
  c.model = "upernet_b1"        # backbone form: Adaptor-T and Adaptor-S in every block
  c.model_overrides = ml_collections.ConfigDict(dict(
      dims=(16, 32, 64, 96), depths=(1, 1, 2, 1), channels=64, aux_channels=32))
  c.drop_path_rate = 0.0
  c.dtype = "float32"
  c.data.name = "seg_digits"
  c.data.image_size = 64        # the crop
  c.data.seg_scale = (64, 64)   # canvases stay 64x64 (times 0.75..1.5 in training)
  c.data.seg_ratio = (1.0, 1.0)  # no rescaling: the demo's digits keep their size
  c.data.reduce_zero_label = False  # the background is a class
  c.data.photometric = False    # gray canvases
  c.data.hflip = 0.0            # a flipped digit is another digit
  c.data.num_workers = 0
  c.batch_size = 16
  c.lr = 2e-3
  c.lr_base_batch = 16
  c.weight_decay = 0.01
  c.schedule = "poly"
  c.epochs = 32.0
  c.warmup_epochs = 0.5
  c.warmup_lr = 1e-6
  c.min_lr = 0.0
  c.grad_clip = 0.0
  c.ema_decay = 0.0
  c.eval_every = 16.0
  c.eval_batch_size = 50
  c.log_every = 25
  c.checkpoint_every = 200
  c.keep = 2
  return c
