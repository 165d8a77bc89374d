"""Every training knob, named and documented once, and the check that runs before any compute.

Experiment files in configs/ start from `default_config()` and change what differs:

  def get_config(arg=None):
    config = default_config()
    config.model = "mamba_adaptor_b2"
    return config

`--config.key=value` on the command line may only override keys that exist here (ml_collections
refuses unknown keys and wrong types); `validate` checks the values, naming the bad key.
"""
import ml_collections

from adaptor_jax import errors, paths
from adaptor_jax.data import config as data_config, transforms
from adaptor_jax.models import common, registry, vmamba
from adaptor_jax.training import tasks

DTYPES = ("float32", "bfloat16")


def default_config():
  """The paper's recipe (VMamba / Swin on ImageNet-1k) for a model still to be chosen."""
  c = ml_collections.ConfigDict()
  c.seed = 0                      # params init, data order, augmentation and drop path
  c.task = "classification"       # what is trained and evaluated: tasks.py (batch, loss, metrics)
  # The model.
  c.model = "mamba_adaptor_b2"    # a preset of adaptor_jax.list_models()
  c.form = ""                     # VMamba family: none|backbone|booster|adaptor; "" = the preset's
  c.share_adaptor = False         # form=adaptor: one adaptor per stage instead of per block
  c.train_only = ""               # "": what the form trains (all; adaptor: adaptors + head);
                                  # "head": linear probing, the classifier only (VMamba family)
  c.model_overrides = ml_collections.ConfigDict()  # other create_model arguments (dims, depths)
  c.drop_path_rate = -1.0         # stochastic depth at the last block; -1 keeps the preset's
  c.dtype = "bfloat16"            # compute dtype (params, optimizer state and EMA stay float32)
  c.scan_backend = "auto"         # kernels.selective_scan backend
  c.remat = "none"                # per block: none | full | matmuls (models/common.py REMAT)
  c.init_from = ""                # a checkpoint dir or URL (ours or a converted VMamba) to start from
  # The data (adaptor_jax.data.config documents each field).
  c.data = data_config.default_data_config()
  c.num_classes = -1              # -1: the dataset's number of classes
  # The schedule, in epochs of the training split.
  c.batch_size = 1024             # global, over all devices and hosts
  c.steps_per_epoch = -1          # -1: the training split's size // batch_size; N > 0: the
                                  # schedule's epochs (and warm-up, eval_every) are N steps each,
                                  # whatever the data (iteration recipes: mmseg's 160k = 160 x 1000)
  c.grad_accum = 1                # micro-batches per step (batch_size divisible by it)
  c.epochs = 300.0
  c.warmup_epochs = 20.0
  c.schedule = "cosine"           # after the linear warm-up: cosine | poly (linear, mmseg's)
  # AdamW with linear scaling: the rates below are per `lr_base_batch` images.
  c.lr = 1e-3
  c.warmup_lr = 1e-6
  c.min_lr = 1e-5
  c.lr_base_batch = 1024
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 0.05           # not on norms, biases, A_log, D, dt bias, gamma, tokens
  c.grad_clip = 5.0               # global norm; 0 disables
  c.ema_decay = 0.9999            # EMA of the params after every step; 0 disables
  c.skip_nonfinite = 0            # steps with a non-finite loss or gradient norm skipped (no
                                  # update) before the run halts; 0: halt at the first
  # Devices: a mesh of (data, fsdp); -1 takes the devices left over. FSDP shards params,
  # optimizer state and EMA over `fsdp`; the batch is split over both axes.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.host_timeout_s = 60.0         # several hosts: a process silent this long (or one that failed)
                                  # ends the job, every other process exits 75 (training/hosts.py)
  # Bookkeeping.
  c.log_every = 50                # steps between progress lines and TensorBoard points
  c.eval_every = 1.0              # epochs between evaluations; 0: only at the end
  c.eval_batch_size = 1024        # global
  c.checkpoint_every = 2000       # steps between (async) checkpoints; one is always written at the end
  c.keep = 3                      # the last `keep` checkpoints are kept, plus the best by EMA top-1
  c.compile_cache = "~/.cache/adaptor_jax/xla"  # persistent XLA compilation cache (a path or
                                  # URL: on a pod, a bucket shares it between hosts); "" disables
  c.max_steps = -1                # stop early after this many steps (the schedule is unchanged)
  return c


def vmamba_config(size, arg=None):
  """configs/vmamba_{size}.py: VMamba-{T,S,B} with the recipe above (drop path: the preset's).
  arg None: from scratch; "booster": adaptor_vmamba_{size}, Adaptor-T/S inserted at zero, the
  whole model trains on, started from converted VMamba weights via config.init_from."""
  variants = {None: f"vmamba_{size}", "booster": f"adaptor_vmamba_{size}"}
  if arg not in variants:
    raise ValueError(f"configs/vmamba_{size}.py:{arg}: the variants are none and 'booster'")
  c = default_config()
  c.model = variants[arg]
  c.data.num_workers = 32  # ~150 images/s per core (benchmarks/input_pipeline.py)
  return c


class ConfigError(errors.UserError, ValueError):
  """A bad config key or value; the message starts with config.KEY."""


def _fail(key, why):
  raise ConfigError(f"config.{key}: {why}")


def validate(config):
  """Raises ConfigError (a ValueError) naming the first bad key; returns the config."""
  c = config
  known = set(default_config().keys())
  for key in c.keys():
    if key not in known:
      _fail(key, f"unknown key; known keys are {sorted(known)}")
  if c.task not in tasks.TASKS:
    _fail("task", f"{c.task!r} is not one of {sorted(tasks.TASKS)}")
  if c.model not in registry.list_models():
    _fail("model", f"{c.model!r} is not a preset; choose one of {registry.list_models()}")
  if registry.task_of(c.model) != c.task:
    _fail("task", f"{c.model} is a {registry.task_of(c.model)} model, not one for {c.task}")
  if c.form and not registry.is_vmamba(c.model):
    _fail("form", f"forms apply to the VMamba family, not {c.model}")
  if c.form not in ("", *vmamba.FORMS):
    _fail("form", f"{c.form!r} is not one of {vmamba.FORMS}")
  if c.share_adaptor and c.form != "adaptor":
    _fail("share_adaptor", "only applies with form='adaptor'")
  if c.train_only not in ("", "head"):
    _fail("train_only", f"{c.train_only!r} is not '' (what the form trains) or 'head'")
  if c.train_only and not registry.is_vmamba(c.model):
    _fail("train_only", f"linear probing applies to the VMamba family, not {c.model}")
  if (c.form == "adaptor" or c.train_only) and not c.init_from:
    _fail("init_from", "the backbone is frozen (form=adaptor or train_only=head): start it from "
          "pretrained weights, a converted VMamba or a run's workdir")
  if c.scan_backend != "auto" and not registry.has_scan(c.model):
    _fail("scan_backend", f"{c.model} has no selective scan; leave it 'auto'")
  if c.remat not in common.REMAT:
    _fail("remat", f"{c.remat!r} is not one of {sorted(common.REMAT)}")
  if c.dtype not in DTYPES:
    _fail("dtype", f"{c.dtype!r} is not one of {DTYPES}")
  if c.steps_per_epoch == 0 or c.steps_per_epoch < -1:
    _fail("steps_per_epoch", f"must be -1 (from the data) or >= 1, got {c.steps_per_epoch}")
  for key in ("batch_size", "grad_accum", "lr_base_batch", "log_every", "eval_batch_size",
              "checkpoint_every", "keep"):
    if c[key] < 1:
      _fail(key, f"must be >= 1, got {c[key]}")
  if c.batch_size % c.grad_accum:
    _fail("grad_accum", f"{c.grad_accum} does not divide batch_size {c.batch_size}")
  for key in ("epochs", "lr"):
    if c[key] <= 0:
      _fail(key, f"must be > 0, got {c[key]}")
  if c.host_timeout_s < 1:
    _fail("host_timeout_s", f"must be >= 1 (seconds), got {c.host_timeout_s}")
  for key in ("warmup_epochs", "warmup_lr", "min_lr", "weight_decay", "grad_clip", "eval_every",
              "skip_nonfinite"):
    if c[key] < 0:
      _fail(key, f"must be >= 0, got {c[key]}")
  if c.schedule not in ("cosine", "poly"):
    _fail("schedule", f"{c.schedule!r} is not cosine or poly")
  if c.warmup_epochs >= c.epochs:
    _fail("warmup_epochs", f"{c.warmup_epochs} must be below epochs {c.epochs}")
  if not 0 <= c.ema_decay < 1:
    _fail("ema_decay", f"must be in [0, 1), got {c.ema_decay}")
  if not (c.drop_path_rate == -1 or 0 <= c.drop_path_rate < 1):
    _fail("drop_path_rate", f"must be -1 (the preset's) or in [0, 1), got {c.drop_path_rate}")
  if c.num_classes == 0 or c.num_classes < -1:
    _fail("num_classes", f"must be -1 (the dataset's) or >= 1, got {c.num_classes}")
  for axis in c.mesh.keys():
    if axis not in ("data", "fsdp"):
      _fail(f"mesh.{axis}", "the mesh axes are data and fsdp")
    if c.mesh[axis] == 0 or c.mesh[axis] < -1:
      _fail(f"mesh.{axis}", f"must be -1 or >= 1, got {c.mesh[axis]}")
  if c.mesh.data == -1 and c.mesh.fsdp == -1:
    _fail("mesh", "at most one axis may be -1")
  for key, value in (("init_from", c.init_from), ("compile_cache", c.compile_cache),
                     ("data.data_dir", c.data.data_dir)):
    if value:
      try:
        paths.resolve(value, f"config.{key}")
      except paths.BadPath as e:
        raise ConfigError(str(e)) from None
  _validate_data(c.data)
  return config


def _validate_data(d):
  known = set(data_config.default_data_config().keys())
  for key in d.keys():
    if key not in known:
      _fail(f"data.{key}", f"unknown key; known keys are {sorted(known)}")
  if not d.name:
    _fail("data.name", "a TFDS dataset name is needed")
  if d.image_size < 8:
    _fail("data.image_size", f"must be >= 8, got {d.image_size}")
  if not 0 < d.crop_pct <= 1:
    _fail("data.crop_pct", f"must be in (0, 1], got {d.crop_pct}")
  for key in ("scale", "ratio"):
    lo, hi = d[key]
    if not 0 < lo <= hi:
      _fail(f"data.{key}", f"must be (low, high) with 0 < low <= high, got {d[key]}")
  if d.scale[1] > 1:
    _fail("data.scale", f"areas are fractions of the image, at most 1; got {d.scale}")
  for key in ("hflip", "reprob", "mixup_switch_prob", "label_smoothing"):
    if not 0 <= d[key] <= 1:
      _fail(f"data.{key}", f"must be in [0, 1], got {d[key]}")
  if not 0 <= d.max_bad_fraction <= 1:
    _fail("data.max_bad_fraction", f"must be in [0, 1], got {d.max_bad_fraction}")
  if d.bad_window < 1:
    _fail("data.bad_window", f"must be >= 1, got {d.bad_window}")
  for key in ("mixup", "cutmix", "num_workers", "prefetch"):
    if d[key] < 0:
      _fail(f"data.{key}", f"must be >= 0, got {d[key]}")
  if d.interpolation not in ("bicubic", "bilinear"):
    _fail("data.interpolation", f"must be bicubic or bilinear, got {d.interpolation!r}")
  if d.randaugment:  # "" turns RandAugment off
    try:
      transforms.parse_rand_augment(d.randaugment)
    except ValueError as e:
      _fail("data.randaugment", str(e))
  if d.eval_bucket < 1:
    _fail("data.eval_bucket", f"must be >= 1, got {d.eval_bucket}")
  if any(r <= 0 for r in d.eval_ratios):
    _fail("data.eval_ratios", f"ratios of the original size must be > 0, got {d.eval_ratios}")
  if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
    _fail("data.mean", f"mean and std need 3 channels, std > 0; got {d.mean}, {d.std}")
