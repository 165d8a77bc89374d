"""The end of a multi-process job (adaptor_jax/training/hosts.py) when one process fails: two
real processes of one jax.distributed job on CPU (tests/hosts_cases.py). A process lost to
kill -9, and train.py's own runs, are in tests/test_buckets.py."""
import os
import subprocess
import sys
import time

import portpicker
import pytest

import train_cases as tc
from adaptor_jax.training import hosts

CASES = os.path.join(tc.REPO, "tests", "hosts_cases.py")


def _job(case):
  """Runs both processes of `case`; [(returncode, stderr, seconds from start)] per process."""
  port, start = portpicker.pick_unused_port(), time.time()
  procs = [subprocess.Popen([sys.executable, CASES, case, str(port), str(i)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=tc.env()) for i in range(2)]
  ended = []
  for p in procs:
    _, err = p.communicate(timeout=120)
    ended.append((p.returncode, err, time.time() - start))
  return ended


def _last_line(text):
  return text.strip().splitlines()[-1]


@pytest.mark.parametrize("failing", [0, 1])
def test_a_process_that_fails_ends_the_others_in_one_line(failing):
  """One process stops with a user error: it says so (exit 1); the other, still stepping, exits
  75 two heartbeats later naming it, instead of waiting on the dead peer for the heartbeat
  timeout. Process 0, which hosts the coordination service, stays up until the other has read
  its mark."""
  ended = _job(f"fails{failing}")
  code, err, _ = ended[failing]
  assert code == 1 and _last_line(err) == (
      f"hosts_cases.py: process {failing}: step 20: the data went bad"), err[-3000:]
  code, err, _ = ended[1 - failing]
  assert code == hosts.LOST_EXIT_CODE, err[-3000:]
  which = "the coordinator, process 0" if failing == 0 else "process 1"
  assert _last_line(err).startswith(
      f"hosts_cases.py: the job lost {which} of 2 (it failed; its log says why); this process "
      "stops too"), _last_line(err)
  both = ended[0][1] + ended[1][1]
  assert "Traceback" not in both and "Fatal Python error" not in both


def test_processes_that_fail_alike_each_say_their_own_error():
  """Both stop at the same step with the same error (as a diverged loss does): each prints its
  own line and exits 1; neither reports the other as lost."""
  for i, (code, err, _) in enumerate(_job("both_fail")):
    assert code == 1 and _last_line(err) == (
        f"hosts_cases.py: process {i}: step 20: the data went bad"), err[-3000:]
    assert "lost" not in err
