"""Flax NNX models: SS2D, Adaptor-T/S, the VMamba backbone and its adaptor forms, Vim, presets."""
from adaptor_jax.models.adaptor import AdaptorConfig
from adaptor_jax.models.registry import create_model, list_models
from adaptor_jax.models.vmamba import VSSM, trainable, trainable_mask

__all__ = ["AdaptorConfig", "VSSM", "create_model", "list_models", "trainable", "trainable_mask"]
