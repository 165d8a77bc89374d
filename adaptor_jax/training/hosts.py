"""Several hosts: joining the job (`initialize`) and ending it cleanly when a process is lost.

A multi-host job is only as alive as its least alive process: when one dies (a host preempted
without notice, kill -9, a crash), the others block in their next collective or checkpoint
barrier. jax.distributed notices a process that stops sending heartbeats and then aborts every
other process from a C++ thread (exit code 134 and a fatal-error dump); a collective whose peer
is gone may instead raise first, in the middle of the step. Neither says what the user needs.

So every process of a multi-process run also runs a watchdog thread. Every `beat_s` seconds it
posts a heartbeat counter to the coordination service's key-value store and reads every other
process's. A process whose counter has not moved for `timeout_s` seconds (config.host_timeout_s)
is lost. Then this process prints one line,

  train.py: the job lost process 1 of 2 (no heartbeat for 60 s); the newest checkpoint is step
  20 in gs://bkt/run/checkpoints; this process stops too: run the same command on every host to
  resume from the newest checkpoint

ends its grain worker processes and exits with code 75 (EX_TEMPFAIL: run it again), within
timeout_s + beat_s of the loss. jax.distributed's own heartbeat timeout is set past ours
(`backstop_s`), so it only acts if this thread cannot run. Process 0 is the exception: it hosts
the coordination service, and when it is lost the runtime aborts every other process within a
second, from C++, before any Python code can speak (exit code 134, the runtime's line saying
that another task died); the watchdog then only keeps Python's fault handler from adding a
dump. A process that fails (an exception in its main thread; see `watched`) marks itself
failed, which ends the others as a loss with that reason.
"""
import atexit
import contextlib
import faulthandler
import multiprocessing
import os
import sys
import threading
import time

import jax
from absl import logging

from adaptor_jax import errors

# Set by the launchers of multi-process jobs (TPU pods, SLURM, Open MPI, explicit coordinators).
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                      "OMPI_COMM_WORLD_SIZE")
LOST_EXIT_CODE = 75  # EX_TEMPFAIL: the job failed for a reason outside it; running it again resumes
DEFAULT_TIMEOUT_S = 60.0
_KEY = "adaptor_jax/alive/"
_DONE, _FAILED = "done", "failed"


def _launched_multi_process():
  """Whether a launcher set up the job (its variables), or this is a Cloud TPU VM: there jax
  finds the slice's hosts from the metadata server (TPU_WORKER_HOSTNAMES is set on GKE only);
  a one-host slice joins a job of one process."""
  if _tpu_chips() > 0:
    return True
  for name in _MULTI_PROCESS_ENV:
    value = os.environ.get(name, "")
    if name == "TPU_WORKER_HOSTNAMES" and "," in value:
      return True
    if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE") and value.isdigit() and int(value) > 1:
      return True
    if name == "JAX_COORDINATOR_ADDRESS" and value:
      return True
  return False


def _tpu_chips():
  """TPU chips on this host's PCI bus (jax's own probe, as jax runs it before using libtpu)."""
  from jax._src import hardware_utils  # noqa: PLC0415
  return hardware_utils.num_available_tpu_chips_and_device_id()[0]


def backstop_s(timeout_s):
  """jax.distributed's heartbeat timeout: past the watchdog's, so the watchdog speaks first."""
  return int(max(2 * timeout_s, timeout_s + 30))


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               timeout_s=DEFAULT_TIMEOUT_S):
  """Joins the job's processes before any device is touched: with explicit arguments, or by
  jax.distributed's auto-detection when a launcher set up several processes; then starts the
  watchdog when there are several (`timeout_s`: see the module docstring). On CPU the
  collectives go through gloo. A single process that no launcher started does nothing."""
  explicit = coordinator_address is not None
  if not (explicit or _launched_multi_process()):
    return
  if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeouts = dict(heartbeat_timeout_seconds=backstop_s(timeout_s),
                  shutdown_timeout_seconds=backstop_s(timeout_s))
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
  else:
    jax.distributed.initialize(**timeouts)
  if jax.process_count() > 1:
    global _WATCHDOG
    _WATCHDOG = _Watchdog(timeout_s)
    _WATCHDOG.start()
    # When process 0 (the coordinator) is lost, the runtime aborts the others from a C++ thread
    # within a second, with its own line ("Terminating process because the JAX distributed
    # service detected fatal errors..."): Python's fault handler would add a dump of healthy
    # threads and the list of extension modules, nothing a user can act on.
    faulthandler.disable()


_WATCHDOG = None


def _client():
  from jax._src import distributed  # noqa: PLC0415 - the client jax.distributed made (as orbax)
  return distributed.global_state.client


class _Watchdog(threading.Thread):
  """The heartbeat thread of one process (see the module docstring)."""

  def __init__(self, timeout_s):
    super().__init__(name="adaptor_jax-watchdog", daemon=True)
    self.timeout_s = timeout_s
    self.beat_s = min(5.0, timeout_s / 4)
    self.me, self.count = jax.process_index(), jax.process_count()
    self.newest = lambda: ""   # where the newest checkpoint is, set by the training loop
    self._stopped = threading.Event()
    self._verdict = threading.Event()

  def run(self):
    client, beat = _client(), 0
    seen = {k: (None, time.monotonic()) for k in range(self.count) if k != self.me}
    while not self._stopped.is_set():
      beat += 1
      try:
        client.key_value_set(f"{_KEY}{self.me}", str(beat), allow_overwrite=True)
        values = dict(client.key_value_dir_get(_KEY))
      except Exception as e:  # noqa: BLE001 - any RPC failure: the service in process 0 is gone
        if not self._stopped.is_set() and seen.get(0, (None,))[0] != _DONE:
          self.lost(0, f"it cannot be reached: {_first_line(e)}")
        return
      now = time.monotonic()
      for k, (last, since) in seen.items():
        value = values.get(f"{_KEY}{k}")
        if value != last:
          seen[k] = (value, now)
        elif value == _FAILED and now - since > 2 * self.beat_s:  # not failing alike meanwhile
          self.lost(k, "it failed; its log says why")
        elif value not in (_DONE, _FAILED) and now - since > self.timeout_s:
          self.lost(k, f"no heartbeat for {self.timeout_s:g} s")
      self._stopped.wait(self.beat_s)

  def lost(self, process, why):
    """Says the job lost `process`, ends this process's children, exits LOST_EXIT_CODE; not
    when this process is ending on its own (its own error speaks)."""
    if self._stopped.is_set():
      return
    self._verdict.set()
    where = self._where()
    which = "the coordinator, process 0" if process == 0 else f"process {process}"
    sys.stdout.flush()
    print(f"{os.path.basename(sys.argv[0])}: the job lost {which} of {self.count} ({why}); "
          f"{where + '; ' if where else ''}this process stops too: run the same command on "
          "every host to resume from the newest checkpoint", file=sys.stderr, flush=True)
    for child in multiprocessing.active_children():  # grain's workers
      child.kill()
    os._exit(LOST_EXIT_CODE)

  def _where(self, wait_s=5.0):
    """self.newest(), or "" when it fails or does not answer within `wait_s` (it reads storage,
    which may be as unwell as the job)."""
    said = []

    def ask():
      try:
        said.append(self.newest())
      except Exception as e:  # noqa: BLE001 - the line must still be printed
        logging.warning("could not tell the newest checkpoint: %s", e)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(wait_s)
    return said[0] if said else ""

  def mark(self, value):
    self._stopped.set()
    with contextlib.suppress(Exception):  # the coordinator may be gone already
      _client().key_value_set(f"{_KEY}{self.me}", value, allow_overwrite=True)

  def fail(self):
    """Marks this process failed; at exit it leaves without jax.distributed's shutdown barrier
    (which would wait for peers that are leaving too, then abort this process). Process 0 first
    keeps the coordination service up for two heartbeats, so the others read the mark."""
    self.mark(_FAILED)

    def leave():
      sys.stdout.flush()
      sys.stderr.flush()
      if self.me == 0:
        time.sleep(2 * self.beat_s + 1)
      os._exit(1)

    atexit.register(leave)  # after jax's own handler: runs first

  def await_verdict(self):
    """Blocks until the watchdog has had the time to find a lost process; once it has, blocks
    for good: the watchdog is printing its line and ends the process (the caller's traceback
    would race it)."""
    if self._verdict.wait(self.timeout_s + 2 * self.beat_s):
      threading.Event().wait()


def _first_line(e):
  return (str(e).strip().splitlines() or [""])[0][:200]


def tell_newest(describe):
  """`describe()` -> a phrase naming the newest checkpoint, for the lost-process line."""
  if _WATCHDOG is not None:
    _WATCHDOG.newest = describe


@contextlib.contextmanager
def watched():
  """Runs the body of a multi-process job (a no-op for one process). A normal end marks this
  process done. A user error (a diverged loss, bad data) marks it failed at once: a peer that
  fails alike within two heartbeats (divergence meets every process at the same step) ends on
  its own error, the others as a loss naming it. Another exception first waits for the
  watchdog's verdict (a collective that failed because a peer died: the loss ends the process
  there), then marks this process failed and is raised."""
  if _WATCHDOG is None:
    yield
    return
  try:
    yield
  except errors.UserError:
    _WATCHDOG.fail()
    raise
  except Exception:
    _WATCHDOG.await_verdict()
    _WATCHDOG.fail()
    raise
  except BaseException:  # KeyboardInterrupt, SystemExit: no verdict to wait for
    _WATCHDOG.fail()
    raise
  _WATCHDOG.mark(_DONE)
