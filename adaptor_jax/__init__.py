"""adaptor_jax: Mamba-Adaptor in JAX/Flax."""
from adaptor_jax.models import create_model, list_models

__all__ = ["create_model", "list_models"]
