"""`config.data`: the input pipeline's knobs, each named and documented once, with defaults.

A module of its own (plain ml_collections) so that the training config can be built where the
input pipeline's dependencies (grain, TFDS) are not installed, e.g. benchmarks/gpu_check.py.
pipeline.py reads these fields.
"""
import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_data_config():
  """ImageNet-1k training defaults (DeiT / Swin / VMamba recipe) for `config.data`."""
  return ml_collections.ConfigDict(dict(
      name="imagenet2012",          # TFDS name: catalog (imagenet2012), "digits", or built folders
      data_dir="",                  # TFDS data_dir; "" = TFDS' default (~/tensorflow_datasets)
      train_split="train",
      eval_split="validation",
      image_size=224,
      crop_pct=0.875,               # eval: resize shorter side to image_size / crop_pct, crop
      scale=(0.08, 1.0),            # random resized crop: area fraction
      ratio=(3 / 4, 4 / 3),         # random resized crop: aspect ratio
      hflip=0.5,                    # horizontal flip probability
      randaugment="rand-m9-mstd0.5-inc1",  # timm spec; "" = off
      interpolation="bicubic",
      reprob=0.25,                  # random erasing probability (device)
      mixup=0.8,                    # mixup alpha; 0 = off (device)
      cutmix=1.0,                   # cutmix alpha; 0 = off (device)
      mixup_switch_prob=0.5,        # probability of cutmix when both are on
      label_smoothing=0.1,
      mean=IMAGENET_MEAN,           # 0..1 units
      std=IMAGENET_STD,
      num_workers=8,                # grain worker processes per host; 0 = in the main process
      prefetch=2,                   # batches buffered per worker
      # Records that cannot be read or decoded are skipped and counted; when more than
      # max_bad_fraction of the last bad_window records read (per iterator) failed, the
      # iterator raises pipeline.BadDataError. 0 = the first failure raises; a window of
      # nothing but failures raises even at 1.
      max_bad_fraction=0.02,
      bad_window=10000,
      # Semantic segmentation (config.task "segmentation"; mmseg's ADE20K pipeline,
      # data/segtransforms.py): image_size is the square crop; hflip, mean and std apply.
      seg_scale=(2048, 512),        # rescale to fit (long, short) keeping the ratio
      seg_ratio=(0.5, 2.0),         # train: seg_scale times U(seg_ratio)
      cat_max_ratio=0.75,           # train crop: redrawn while one class covers this much
      photometric=True,             # train: mmseg's PhotoMetricDistortion
      reduce_zero_label=True,       # label 0 ("other") ignored, 1..N -> 0..N-1
      eval_bucket=32,               # eval: images padded to multiples of this (the backbone's
                                    # stride), label maps too; a batch shares one canvas
      eval_ratios=(),               # eval: () one view, rescaled to fit seg_scale (mmseg's
                                    # single-scale test); else a view per ratio of the original
                                    # size (its tta_pipeline: 0.5, 0.75, ..., 1.75), softmax mean
      eval_flip=False,              # eval: each view also flipped (averaged in)
  ))
