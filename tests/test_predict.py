"""A run as a classifier (adaptor_jax/training/predict.py): its preprocessing is the run's own
evaluation path, every image form gives the same logits, the class names come with the
checkpoint. The run is `run8` (conftest.py: the tiny demo, 8 steps, on digits)."""
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import adaptor_jax
import train_cases as tc
from adaptor_jax.data import builders, pipeline
from adaptor_jax.training import loader


@pytest.fixture(scope="module")
def clf(run8):
  return adaptor_jax.load_classifier(run8)


@pytest.fixture(scope="module")
def digits():
  images, labels, _, held_out = builders.digits_arrays()
  return images[held_out], labels[held_out]


def test_predictions_are_the_runs_evaluation(clf, run8, robust_data):
  """The held-out digits as arrays (8x8 grayscale, 0..255) give the logits of the same digits
  through the evaluation pipeline (TFDS records, PNG decoded, eval transform), bit for bit; so
  top-1 is the run's own evaluation of its EMA weights."""
  cfg = clf.config.data.copy_and_resolve_references()
  cfg.data_dir = str(robust_data)
  source = pipeline.open_source(cfg, "validation")  # records in TFDS' order: match by file
  order = [int(source[i]["file_name"].decode().split(".")[0]) for i in range(len(source))]
  all_images, all_labels, _, _ = builders.digits_arrays()
  images, labels = all_images[order], all_labels[order]
  batch = next(pipeline.eval_iterator(cfg, batch_size=len(labels)))
  assert batch["mask"].all()
  np.testing.assert_array_equal(batch["label"], labels)
  from adaptor_jax.data import augment  # noqa: PLC0415
  want = np.asarray(clf._forward(clf.model, augment.eval_batch(batch["image"], cfg)))  # pylint: disable=protected-access
  np.testing.assert_array_equal(clf.logits(images), want)
  predictions = clf.predict(images, top_k=3)
  top1 = np.mean([p[0][0] == clf.class_names[y] for p, y in zip(predictions, labels)])
  logged = [m for m in tc.read_metrics(run8) if "eval/top1" in m][-1]["eval/top1"]
  assert abs(top1 - logged) <= 1 / len(labels), (top1, logged)  # logits to float rounding
  probabilities = [p for row in predictions for _, p in row]
  assert all(len(row) == 3 for row in predictions) and 0 < min(probabilities) <= 1


def test_every_image_form_gives_the_same_logits(clf, digits):
  images = digits[0][:3]
  rgb = np.repeat(images[..., None], 3, axis=-1)
  want = clf.logits(images)  # (N, H, W) grayscale batch
  forms = {
      "grayscale list": list(images), "rgb batch": rgb, "rgb list": list(rgb),
      "rgba": [np.concatenate([im, np.full(im.shape[:2] + (1,), 255, np.uint8)], -1)
               for im in rgb],
      "pil": [Image.fromarray(im) for im in images],
      "png bytes": [_png(im) for im in rgb],
  }
  for name, form in forms.items():
    np.testing.assert_array_equal(clf.logits(form), want, err_msg=name)
  # one image: another batch size, another compiled program; float32 rounding apart
  np.testing.assert_allclose(clf.logits(images[0]), want[:1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="images are uint8"):
    clf.logits(images.astype(np.float32))


def _png(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def test_class_names_come_with_the_checkpoint(clf, run8, tmp_path):
  """The names saved with each checkpoint; a checkpoint saved before they were gets them from
  its dataset; a converted checkpoint is no classifier."""
  assert clf.class_names == [str(i) for i in range(10)]
  step = tmp_path / "8"
  shutil.copytree(run8 / "checkpoints" / "8", step)
  assert json.loads((step / "labels" / "metadata").read_text()) == {"names": clf.class_names}
  shutil.rmtree(step / "labels")
  config = json.loads((step / "config" / "metadata").read_text())
  assert loader.read_class_names(loader.find(step)) is None
  assert pipeline.class_names(loader.read_config(loader.find(step)).data) == clf.class_names
  assert adaptor_jax.load_classifier(step).class_names == clf.class_names
  assert config["data"]["name"] == "digits"
