"""Test-wide settings."""
import os

import jax
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret


@pytest.fixture(autouse=True, scope="session")
def fast_compiles():
  """Most test programs (interpreted kernels above all) are big and run once: skip XLA's
  expensive optimisation passes. Tests that measure compiled memory turn them back on."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield


@pytest.fixture(autouse=True, scope="session")
def xla_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session: its xdist workers and every
  subprocess they start (train.py, the converters, the multi-device scripts) compile a program
  once between them. Building a small model compiles ~90 tiny initialiser programs (~20 s on
  this CPU, 3 s from the cache). Cached executables are the ones a compile gives, so exact
  comparisons between runs are unaffected."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' temp roots share a parent
    root = root.parent
  path = str(root / "xla_cache")
  settings = dict(JAX_COMPILATION_CACHE_DIR=path, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  os.environ.update(settings)  # the subprocesses' environment
  for name, value in settings.items():
    jax.config.update(name.lower(), value if name.endswith("DIR") else int(value))
  yield path


@pytest.fixture
def full_optimizations():
  """For programs compiled as a run compiles them (the TPU compiles): XLA's optimisations on."""
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def race_states(monkeypatch):
  """Collects the race detector of every TPU-interpreted kernel (one per pallas_call run) and
  fails the test if any of them saw a data race. Yields the list for tests that inspect it."""
  made = []
  original = tpu_interpret.RaceDetectionState

  def record(*args, **kwargs):
    state = original(*args, **kwargs)
    made.append(state)
    return state

  monkeypatch.setattr(tpu_interpret, "RaceDetectionState", record)
  yield made
  assert not any(s.races_found for s in made), "the race detector reported a data race"


@pytest.fixture(scope="session")
def shared(tmp_path_factory, worker_id):
  """A directory every xdist worker of this session sees (the session's temp root); with
  train_cases.once, what one worker makes there serves them all."""
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":
    root = root.parent
  path = root / "training"
  path.mkdir(exist_ok=True)
  return path
