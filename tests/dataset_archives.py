"""Tiny datasets in their distributed formats, written inside tests: CIFAR-100's python archive,
SVHN's cropped-digit .mat files, Food-101's archive (tests/test_catalog.py, tests/test_transfer.py)."""
import io
import os
import pickle
import tarfile

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
