"""Test-wide settings."""
import jax
import pytest


@pytest.fixture(autouse=True, scope="session")
def fast_compiles():
  """Most test programs (interpreted kernels above all) are big and run once: skip XLA's
  expensive optimisation passes. Tests that measure compiled memory turn them back on."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield


@pytest.fixture
def full_optimizations():
  """For programs compiled as a run compiles them (the TPU compiles): XLA's optimisations on."""
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", True)
