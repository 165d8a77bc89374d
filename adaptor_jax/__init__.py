"""adaptor_jax: Mamba-Adaptor in JAX/Flax."""
