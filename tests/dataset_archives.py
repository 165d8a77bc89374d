"""Tiny datasets in their distributed formats, written inside tests: CIFAR-100's python archive,
SVHN's cropped-digit .mat files, Food-101's archive (tests/test_catalog.py, tests/test_transfer.py),
ADE20K's ADEChallengeData2016.zip (tests/test_ade20k.py)."""
import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
from PIL import Image
from scipy import io as sio


def image_bytes(rng, fmt, shape=(12, 10)):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def add_member(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_cifar100(path, rng, fine=((3, 57, 99, 3, 57, 99), (99, 3, 57)), skip=()):
  """A cifar-100-python.tar.gz as distributed: Python-2 pickles (bytes keys and strings).

  fine: the fine labels of train and test (coarse = fine % 20). Returns (fine names, coarse
  names, {split: the split's dict}).
  """
  fine_names = [f"fine_{i:02d}" for i in range(100)]
  coarse_names = [f"coarse_{i:02d}" for i in range(20)]
  dicts = {"meta": {b"fine_label_names": [n.encode() for n in fine_names],
                    b"coarse_label_names": [n.encode() for n in coarse_names]}}
  for split, labels in zip(("train", "test"), fine):
    dicts[split] = {b"batch_label": f"{split} batch 1 of 1".encode(),
                    b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
                    b"fine_labels": list(labels), b"coarse_labels": [f % 20 for f in labels],
                    b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)}
  with tarfile.open(path, "w:gz") as tar:
    for member, d in dicts.items():
      if member not in skip:
        add_member(tar, f"cifar-100-python/{member}", pickle.dumps(d, protocol=2))
  return fine_names, coarse_names, dicts


def write_svhn(directory, rng, labels):
  """{split: (X (32, 32, 3, N) uint8, y (N, 1) uint8)} written as <split>_32x32.mat."""
  os.makedirs(directory, exist_ok=True)
  arrays = {}
  for split, y in labels.items():
    x = rng.integers(0, 256, (32, 32, 3, len(y)), dtype=np.uint8)
    y = np.asarray(y, np.uint8).reshape(-1, 1)
    sio.savemat(os.path.join(directory, f"{split}_32x32.mat"), {"X": x, "y": y})
    arrays[split] = (x, y)
  return arrays


FOOD_CLASSES = ("apple_pie", "baklava", "waffles")


def write_food101(path, rng, train=None, test=None, drop=(), corrupt=()):
  """A food-101.tar.gz as distributed (meta/*.txt, images/<class>/<id>.jpg); returns
  ({image name: JPEG bytes}, train names, test names). `drop`: image names left out;
  `corrupt`: image names whose bytes are not an image."""
  images = {f"{c}/{1000 + 7 * i + j}": image_bytes(rng, "JPEG", (20 + i, 24))
            for j, c in enumerate(FOOD_CLASSES) for i in range(3)}
  images.update({name: b"\xff\xd8\xff\xe0 not a jpeg" for name in corrupt})
  names = sorted(images)
  first = [n for n in names if int(n.split("/")[1]) < 1000 + len(FOOD_CLASSES)]  # 1 per class
  train = [n for n in names if n not in first] if train is None else train
  test = [n for n in names if n not in train] if test is None else test
  with tarfile.open(path, "w:gz") as tar:
    add_member(tar, "food-101/README.txt", b"Food-101")
    for name in names:  # images first, then meta, as order mustn't matter
      if name not in drop:
        add_member(tar, f"food-101/images/{name}.jpg", images[name])
    add_member(tar, "food-101/meta/classes.txt", "\n".join(FOOD_CLASSES).encode() + b"\n")
    add_member(tar, "food-101/meta/train.txt", "\n".join(train).encode() + b"\n")
    add_member(tar, "food-101/meta/test.txt", "\n".join(test).encode() + b"\n")
  return images, train, test


def jpeg(array, quality=95):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def png_bytes(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


ADE_NAMES = ["wall", "building;edifice", "sky"] + [f"thing{i};other name" for i in range(4, 151)]


def write_ade20k(path, rng, sizes=None, folder=False, break_pair=None):
  """A tiny ADEChallengeData2016.zip (or folder when `folder`) as distributed: images/{training,
  validation}/ADE_*.jpg, annotations/.../ADE_*.png (8-bit labels 0..150), objectInfo150.txt.
  sizes: {split: [(height, width, kind)]}, kind "rgb", "gray" (a grayscale JPEG) or "ignored"
  (an annotation of 0 only). break_pair: "unpaired" / "size" / "label" spoils the first train
  pair. Returns {split: [(file stem, image array as it decodes to RGB, labels)]}."""
  sizes = sizes or {"train": [(37, 53, "rgb"), (29, 41, "gray"), (40, 32, "ignored")],
                    "validation": [(33, 47, "rgb"), (26, 35, "rgb")]}
  info = "Idx\tRatio\tTrain\tVal\tName\n" + "".join(
      f"{i}\t0.01\t10\t1\t{name}\n" for i, name in enumerate(ADE_NAMES, 1))
  files, made = {"objectInfo150.txt": info.encode()}, {}
  for split, folder_name in (("train", "training"), ("validation", "validation")):
    made[split] = []
    for n, (h, w, kind) in enumerate(sizes[split], 1):
      stem = f"ADE_{folder_name[:5]}_{n:08d}"
      smooth = np.repeat(np.repeat(rng.integers(0, 256, (h // 4 + 1, w // 4 + 1)), 4, 0), 4, 1)
      gray = smooth[:h, :w].astype(np.uint8)
      image = gray if kind == "gray" else np.stack([gray, 255 - gray, gray // 2], -1)
      labels = np.zeros((h, w), np.uint8) if kind == "ignored" else rng.integers(
          0, 151, (h, w)).astype(np.uint8)
      if kind != "ignored":
        labels[0, 0], labels[-1, -1] = 0, 150  # both ends of the range
      data = jpeg(image)
      if break_pair == "size" and split == "train" and n == 1:
        labels = labels[:-1]
      if break_pair == "label" and split == "train" and n == 1:
        labels[1, 1] = 151
      files[f"images/{folder_name}/{stem}.jpg"] = data
      if not (break_pair == "unpaired" and split == "train" and n == 1):
        files[f"annotations/{folder_name}/{stem}.png"] = png_bytes(labels)
      decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
      made[split].append((stem, decoded, labels))
  if folder:
    for name, data in files.items():
      target = os.path.join(path, "ADEChallengeData2016", name)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, "wb") as f:
        f.write(data)
  else:
    with zipfile.ZipFile(path, "w") as z:
      for name, data in files.items():
        z.writestr(f"ADEChallengeData2016/{name}", data)
  return made
