"""Test-wide settings."""
import jax
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret


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
