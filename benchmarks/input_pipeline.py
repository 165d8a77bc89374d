"""Throughput of the training input pipeline (decode + ImageNet train transforms + batching).

  python benchmarks/input_pipeline.py [--num_workers=0,2] [--seconds=20] [--batch_size=64]
      [--images=300] [--data_dir=DIR --name=NAME] [--bucket=gs://BUCKET/DIR]

Without --name it builds a synthetic ImageNet-like image folder in a temp dir (random smooth
JPEGs of 500x375 / 375x500, quality 90, 10 classes) and runs `pipeline.train_iterator` with the
ImageNet defaults (224, RandAugment rand-m9-mstd0.5-inc1, bicubic) for each worker count, after a
warm-up (worker start-up excluded). "per core" = images per CPU-second of the main process and
its workers, which stays meaningful on a busy machine; images/s is wall-clock. Also times the two JPEG decoders on one core on a
500x375 JPEG. With --bucket the same dataset is also copied there (builders: built locally,
then copied) and every worker count is measured reading it from the bucket too (TFDS' metadata
through gcsfs, the records through array_record's own GCS reader); run it on the host that
will train, against the bucket it will read, to see whether direct reads keep up. Prints a table and writes benchmarks/results/input-pipeline-<platform>.json.
"""
import argparse
import io
import json
import os
import platform as platform_lib
import tempfile
import time

import jax
import numpy as np
import simplejpeg
from PIL import Image

from adaptor_jax.data import builders, pipeline


def cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform_lib.processor()


def synthetic_jpeg(rng, width=500, height=375, quality=90):
  """A photo-like JPEG: smooth random colour fields plus mild noise (pure noise is atypical)."""
  coarse = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
  noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(noisy).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def decoder_rates(seconds=2.0):
  """Images/s of simplejpeg and PIL decoding one 500x375 JPEG to RGB, on this core."""
  data = synthetic_jpeg(np.random.default_rng(0))
  decoders = {
      "simplejpeg": lambda: simplejpeg.decode_jpeg(data, colorspace="RGB"),
      "pil": lambda: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
  }
  np.testing.assert_array_equal(decoders["simplejpeg"](), decoders["pil"]())  # same pixels
  rates = {}
  for name, fn in decoders.items():
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      fn()
      count += 1
    rates[name] = count / (time.perf_counter() - start)
  return dict(jpeg_bytes=len(data), images_per_s={k: round(v, 1) for k, v in rates.items()},
              simplejpeg_speedup=round(rates["simplejpeg"] / rates["pil"], 2))


def _process_tree_cpu_seconds():
  """User + system CPU seconds of this process and all its descendants (Linux /proc)."""
  stats = {}
  for pid in os.listdir("/proc"):
    if pid.isdigit():
      try:
        with open(f"/proc/{pid}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      stats[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime+stime
  tree, frontier = {os.getpid()}, [os.getpid()]
  while frontier:
    parent = frontier.pop()
    children = [pid for pid, (ppid, _) in stats.items() if ppid == parent]
    tree.update(children)
    frontier += children
  return sum(stats[pid][1] for pid in tree if pid in stats) / os.sysconf("SC_CLK_TCK")


def measure(cfg, *, batch_size, num_workers, seconds):
  """Training-pipeline throughput for `cfg` (config.data) with `num_workers` worker processes.

  Returns {"images_per_s", "images_per_s_per_core", ...}: wall-clock images/s, and images per
  CPU-second used by the main process and its workers in the timed window (what one core
  delivers, unaffected by other load on the machine). Warm-up (worker start-up and two batches
  per worker) is not timed.
  """
  cfg = cfg.copy_and_resolve_references()
  cfg.num_workers = num_workers
  start = time.perf_counter()
  it = pipeline.train_iterator(cfg, batch_size=batch_size, seed=0, process_index=0,
                               process_count=1)
  try:
    for _ in range(max(1, 2 * num_workers)):
      next(it)
    startup = time.perf_counter() - start
    images, cpu, start = 0, _process_tree_cpu_seconds(), time.perf_counter()
    while time.perf_counter() - start < seconds:
      images += len(next(it)["label"])
    elapsed, cpu = time.perf_counter() - start, _process_tree_cpu_seconds() - cpu
  finally:
    it.close()
  return dict(num_workers=num_workers, batch_size=batch_size, images=images,
              seconds=round(elapsed, 2), cpu_seconds=round(cpu, 2), startup_s=round(startup, 2),
              images_per_s=round(images / elapsed, 1),
              images_per_s_per_core=round(images / max(cpu, 1e-9), 1))


def build_synthetic(data_dir, images, classes=10, seed=0, root=None):
  """An image-folder dataset `synthetic_imagenet` of `images` JPEGs in `data_dir` (a path or
  URL); the JPEGs are written under `root` (default data_dir/images)."""
  rng = np.random.default_rng(seed)
  root = root or os.path.join(data_dir, "images")
  for i in range(images):
    class_dir = os.path.join(root, f"n{i % classes:08d}")
    os.makedirs(class_dir, exist_ok=True)
    width, height = (500, 375) if i % 3 else (375, 500)
    with open(os.path.join(class_dir, f"{i:05d}.JPEG"), "wb") as f:
      f.write(synthetic_jpeg(rng, width, height))
  builders.build_image_folder(root, data_dir, "synthetic_imagenet", validation_fraction=0.0)
  return "synthetic_imagenet"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_workers", default=None,
                      help="comma-separated worker counts; default 0 and the core count")
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--images", type=int, default=300, help="synthetic dataset size")
  parser.add_argument("--data_dir", default=None, help="with --name: an existing dataset")
  parser.add_argument("--name", default=None)
  parser.add_argument("--bucket", default=None, help="also measure reading from this URL")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  workers = ([int(w) for w in args.num_workers.split(",")] if args.num_workers
             else sorted({0, os.cpu_count() or 1}))

  decoders = decoder_rates()
  print(f"JPEG 500x375 ({decoders['jpeg_bytes']} bytes), one core: "
        + ", ".join(f"{k} {v:.0f} images/s" for k, v in decoders["images_per_s"].items())
        + f"  (simplejpeg {decoders['simplejpeg_speedup']:.2f}x)")

  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    cfg = pipeline.default_data_config()
    if args.name:
      cfg.name, cfg.data_dir, dataset = args.name, args.data_dir, args.name
    else:
      cfg.name, cfg.data_dir = build_synthetic(tmp, args.images), tmp
      dataset = f"synthetic: {args.images} random JPEGs 500x375"
    data_dirs = [cfg.data_dir]
    if args.bucket:
      if args.name:
        raise SystemExit("--bucket copies the synthetic dataset: leave out --name")
      build_synthetic(args.bucket, args.images, root=os.path.join(tmp, "images"))
      data_dirs.append(args.bucket)
    rows = []
    print(f"{'workers':>7} {'images/s':>9} {'CPU s':>6} {'per core':>9} {'startup s':>9}  from")
    for data_dir in data_dirs:
      cfg.data_dir = data_dir
      for w in workers:
        row = measure(cfg, batch_size=args.batch_size, num_workers=w, seconds=args.seconds)
        row["data_dir"] = "bucket" if data_dir == args.bucket else "local disk"
        rows.append(row)
        print(f"{w:>7} {row['images_per_s']:>9} {row['cpu_seconds']:>6} "
              f"{row['images_per_s_per_core']:>9} {row['startup_s']:>9}  {row['data_dir']}")

  platform = jax.default_backend()
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"input-pipeline-{platform}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(dict(platform=platform, cpu=cpu_model(), cpu_count=os.cpu_count(),
                   load_average_before=[round(x, 2) for x in load_before], dataset=dataset,
                   transforms=dict(image_size=cfg.image_size, randaugment=cfg.randaugment,
                                   interpolation=cfg.interpolation),
                   jpeg_decoders=decoders, train_pipeline=rows), f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
