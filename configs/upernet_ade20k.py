"""UperNet on ADE20K-150 at 512x512, VMamba's recipe (mmseg: segmentation/configs/vssm1/
upernet_vssm_4xb4-160k_ade20k-512x512_*.py and the Swin bases it inherits): 160k iterations at
batch 16, AdamW 6e-5 with weight decay 0.01, 1,500 iterations of linear warm-up from 1e-6 x,
then poly (power 1) to 0; evaluation every 16k iterations. :MODEL is b1, b2 (default),
vmamba_tiny, vmamba_small or vmamba_base (drop path: the preset's, as VMamba's 0.2 / 0.3 / 0.6).
The data pipeline (resize to fit 2048x512 times 0.5-2, crop 512 with cat_max_ratio 0.75, flip,
photometric distortion, reduce_zero_label) is data/config.py's default.

python -m adaptor_jax.data.builders --dataset=ade20k --source=ADEChallengeData2016.zip --data_dir=D
python train.py --config=configs/upernet_ade20k.py:b2 --workdir=DIR --config.data.data_dir=D \
    --config.init_from=IMAGENET_WORKDIR     # a configs/b2.py run, or a converted VMamba
python eval.py --workdir=DIR [--multiscale]
"""
from adaptor_jax.training.config import default_config

MODELS = ("b1", "b2", "vmamba_tiny", "vmamba_small", "vmamba_base")


def get_config(arg=None):
  arg = arg or "b2"
  if arg not in MODELS:
    raise ValueError(f"configs/upernet_ade20k.py:{arg}: the variants are {', '.join(MODELS)}")
  c = default_config()
  c.task = "segmentation"
  c.model = f"upernet_{arg}"
  c.data.name = "ade20k"
  c.data.image_size = 512        # the crop
  c.data.num_workers = 16
  c.batch_size = 16
  c.steps_per_epoch = 1000       # the schedule in thousands of iterations
  c.epochs = 160.0
  c.warmup_epochs = 1.5
  c.schedule = "poly"
  c.lr = 6e-5
  c.lr_base_batch = 16
  c.warmup_lr = 6e-11            # LinearLR's start_factor 1e-6
  c.min_lr = 0.0
  c.weight_decay = 0.01          # registry.decay_mask: weights only (mmseg: all but norms)
  c.grad_clip = 0.0
  c.ema_decay = 0.0
  c.eval_every = 16.0
  c.eval_batch_size = 8
  c.checkpoint_every = 16000
  return c
