"""adaptor_jax: Mamba-Adaptor in JAX/Flax."""
from adaptor_jax.models import create_model, list_models


def load_model(path, *, ema=True, device=None):
  """(model, config) from a training workdir, a checkpoint step directory or a converted VMamba
  checkpoint, on this process's first device (or `device`), in eval mode, with the EMA weights
  when the run kept them. See adaptor_jax.training.loader.load_model."""
  from adaptor_jax.training import loader  # noqa: PLC0415 - keeps `import adaptor_jax` light
  return loader.load_model(path, ema=ema, device=device)


def load_classifier(path, *, ema=True, device=None):
  """A run as an image classifier: `.predict(images)` gives each image's top-5 class names and
  probabilities, through the run's own evaluation preprocessing (uint8 images of any size).
  See adaptor_jax.training.predict."""
  from adaptor_jax.training import predict  # noqa: PLC0415 - keeps `import adaptor_jax` light
  return predict.load_classifier(path, ema=ema, device=device)


__all__ = ["create_model", "list_models", "load_classifier", "load_model"]
