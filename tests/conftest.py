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


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A Cloud Storage server on 127.0.0.1 for this worker (tests/gcs_server.py), its variables in
  os.environ (so in the subprocesses too): `gcs.bucket(name)` makes a bucket, gs://name."""
  import gcs_server  # noqa: PLC0415
  server = gcs_server.GcsServer(tmp_path_factory.mktemp("gcs")).start()
  yield server
  server.stop()


@pytest.fixture(scope="session")
def robust_data(shared):
  """The digits dataset of the train.py runs of test_robustness.py and test_buckets.py; their
  compilation cache is ../xla_cache (the same programs)."""
  from adaptor_jax.data import builders  # noqa: PLC0415
  path = shared / "robust" / "tfds"
  builders.build_digits(str(path))
  return path


@pytest.fixture(scope="session")
def run8(shared, robust_data):
  """A tiny run of 8 steps with checkpoints at 2, 4, 6 and 8 (all kept), made once for all the
  session's workers: the uninterrupted run others are compared with."""
  import shutil  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import train_cases as tc  # noqa: PLC0415
  workdir = shared / "robust" / "run8"
  with tc.once(shared / "robust" / "run8_made") as first:
    if first:
      shutil.rmtree(workdir, ignore_errors=True)
      cmd = tc.train_cmd(workdir, robust_data, robust_data.parent / "xla_cache",
                         "--config.max_steps=8", "--config.checkpoint_every=2",
                         "--config.keep=5")
      done = subprocess.run(cmd, capture_output=True, text=True, cwd=tc.REPO, env=tc.env(),
                            timeout=600, check=False)
      assert done.returncode == 0, done.stderr[-3000:]
  return workdir
