"""A trained run as an image classifier, for notebooks:

  clf = adaptor_jax.load_classifier("/tmp/demo")      # a workdir, a step directory (or a URL)
  clf.predict(images)          # [[("7", 0.98), ("1", 0.01), ...], ...]: top-5 names per image
  clf.class_names, clf.model, clf.config, clf.preprocess(images), clf.logits(images)

`images`: uint8 arrays (H, W, 3) or (H, W) (grayscale), PIL images or encoded files (bytes), of
any size: one, a list, or a batch (N, H, W, 3) or (N, H, W). Each goes through the run's own evaluation
transform (resize, centre crop: transforms.eval_transform with config.data) and normalisation
(augment.eval_batch), exactly as eval.py feeds its images. The class names are the dataset's
label names, saved with every checkpoint; a checkpoint from before they were saved reads them
from its dataset when that is at hand, else names the classes by index.
"""
import dataclasses

import jax
import ml_collections
import numpy as np
from flax import nnx

from adaptor_jax.data import augment, pipeline, transforms
from adaptor_jax.training import loader


@dataclasses.dataclass
class Classifier:
  """A model in eval mode, the config it was trained with and its class names."""
  model: nnx.Module
  config: ml_collections.ConfigDict
  class_names: list

  def __post_init__(self):
    self._forward = nnx.jit(lambda m, x: m(x))

  def preprocess(self, images):
    """float32 (N, S, S, 3): `images` resized, cropped and normalised as the run evaluates."""
    if isinstance(images, np.ndarray) and (images.ndim == 4 or (
        images.ndim == 3 and images.shape[-1] not in (3, 4))):  # (N, H, W, C) or (N, H, W)
      images = list(images)
    elif not isinstance(images, (list, tuple)):
      images = [images]
    cfg = self.config.data
    return np.asarray(augment.eval_batch(
        np.stack([transforms.eval_transform(_rgb(im), cfg) for im in images]), cfg))

  def logits(self, images):
    """float32 (N, classes) of `images`."""
    return np.asarray(self._forward(self.model, self.preprocess(images)))

  def predict(self, images, top_k=5):
    """Per image, its `top_k` most probable classes as (name, probability), best first."""
    logits = self.logits(images)
    probs = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))
    best = np.argsort(-probs, axis=-1)[:, :top_k]
    return [[(self.class_names[c], float(p[c])) for c in row] for p, row in zip(probs, best)]


def _rgb(image):
  """uint8 (H, W, 3) of an array, a PIL image or encoded bytes."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    return transforms.decode(bytes(image))
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"images are uint8 (0..255), got {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.ndim != 3 or image.shape[2] not in (3, 4):
    raise ValueError(f"an image is (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
  return np.ascontiguousarray(image[:, :, :3])


def load_classifier(path, *, ema=True, device=None):
  """The Classifier of a workdir (its newest checkpoint) or a step directory: load_model's
  model (EMA weights when kept), the run's config and its class names."""
  found = loader.find(path, ema, what="load_classifier")
  if found.kind == "converted":
    raise loader.NotACheckpoint(f"{found.path} is a converted checkpoint: it has no dataset, "
                                "so no preprocessing or class names; use load_model")
  model, config = loader.load_model(path, ema=ema, device=device)
  names = loader.read_class_names(found)
  if names is None:
    try:
      names = pipeline.class_names(config.data)
    except pipeline.DatasetMissing:
      names = [str(i) for i in range(config.num_classes)]
  return Classifier(model, config, list(names))
