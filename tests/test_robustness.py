"""A long run survives what goes wrong, as a user meets it through train.py and eval.py:
divergence halts without saving a bad state, a damaged newest checkpoint falls back to the one
before, config mistakes end in one line, SIGTERM ends a data wait or an evaluation."""
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import train_cases as tc
from adaptor_jax.training import checkpoint, loader, loop

TINY = tc.TINY_CONFIG


def _cmd(workdir, robust_data, *flags):
  """train.py on the tiny config; its runs share a compilation cache (the same programs)."""
  return [sys.executable, os.path.join(tc.REPO, "train.py"), f"--config={TINY}",
          f"--workdir={workdir}", f"--config.data.data_dir={robust_data}",
          f"--config.compile_cache={os.path.join(os.path.dirname(robust_data), 'xla_cache')}",
          *flags]


def _train(workdir, robust_data, *flags, timeout=600):
  cmd = _cmd(workdir, robust_data, *flags)
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=tc.REPO, env=tc.env(),
                        timeout=timeout, check=False)
  return done.returncode, done.stdout + done.stderr  # the run's lines, then its errors


def _last_line(stderr):
  return stderr.strip().splitlines()[-1]


def test_divergence_halts_naming_the_step_and_keeps_the_good_checkpoints(tmp_path, robust_data):
  code, err = _train(tmp_path / "w", robust_data, "--config.lr=1e6", "--config.max_steps=20",
                     "--config.checkpoint_every=2", "--config.keep=2")
  assert code == 1 and "Traceback" not in err, err[-3000:]
  last = _last_line(err)
  assert last.startswith("train.py: step 3: loss nan, gradient norm nan: not finite"), last
  assert last.endswith("the newest checkpoint, kept, is step 2"), last
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["2"]


def test_skip_nonfinite_skips_then_halts(tmp_path, robust_data):
  code, err = _train(tmp_path / "w", robust_data, "--config.lr=1e6", "--config.max_steps=20",
                     "--config.skip_nonfinite=2")
  assert code == 1, err[-3000:]
  assert "step 5: loss nan" in _last_line(err) and "(3 such steps; config.skip_nonfinite=2)" in \
      _last_line(err), _last_line(err)
  assert err.count("not finite; skipped") == 2


def _damage(step_dir, how):
  """Damages one item of a checkpoint step the way files get damaged; returns the item."""
  chunks = sorted((step_dir / "params" / "ocdbt.process_0" / "d").iterdir(),
                  key=lambda p: -p.stat().st_size)
  if how == "delete":
    chunks[0].unlink()
  elif how == "truncate":
    with open(chunks[0], "r+b") as f:
      f.truncate(chunks[0].stat().st_size // 2)
  else:  # the data iterator's state
    (step_dir / "data" / "process_0-of-1.json").write_text("")
  return "data" if how == "empty_json" else "params"


def test_damaged_checkpoints_fall_back_to_the_newest_readable_one(run8, tmp_path, robust_data):
  """Steps 8, 6 and 4 damaged three ways (a chunk file deleted, one truncated to half, the data
  iterator's JSON emptied): one restart names each, sets them aside, resumes from 2, and its
  losses equal the uninterrupted run's."""
  workdir = tmp_path / "w"
  shutil.copytree(run8, workdir)
  items = {step: _damage(workdir / "checkpoints" / str(step), how)
           for step, how in ((8, "delete"), (6, "truncate"), (4, "empty_json"))}
  code, err = _train(workdir, robust_data, "--config.max_steps=8", "--config.checkpoint_every=2",
                     "--config.keep=5")
  assert code == 0, err[-3000:]
  for step, item in items.items():
    assert f"checkpoint {workdir}/checkpoints/{step}/{item} cannot be read" in err, step
  assert "resumed from step 2" in err
  assert sorted(os.listdir(workdir / "checkpoints")) == [
      "2", "4", "4.damaged", "6", "6.damaged", "8", "8.damaged"]
  assert tc.train_losses(tc.read_metrics(workdir)) == tc.train_losses(tc.read_metrics(run8))


def test_no_readable_checkpoint_stops_in_one_line(run8, tmp_path, robust_data):
  workdir = tmp_path / "w"
  shutil.copytree(run8, workdir)
  for step in ("2", "4", "6", "8"):
    (workdir / "checkpoints" / step / "data" / "process_0-of-1.json").write_text("{")
  code, err = _train(workdir, robust_data, "--config.max_steps=8")
  assert code == 1 and "Traceback" not in err, err[-3000:]
  assert _last_line(err).startswith(f"train.py: no checkpoint in {workdir}/checkpoints can be "
                                    "read: checkpoint"), _last_line(err)


def test_eval_names_the_damaged_file(run8, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(run8, workdir)
  (workdir / "checkpoints" / "8" / "config" / "metadata").write_text("{")
  done = subprocess.run([sys.executable, os.path.join(tc.REPO, "eval.py"),
                         f"--workdir={workdir}"], capture_output=True, text=True, env=tc.env(),
                        check=False)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert _last_line(done.stderr).startswith(
      f"eval.py: checkpoint {workdir}/checkpoints/8/config/metadata cannot be read"
      " (JSONDecodeError"), _last_line(done.stderr)


def test_eval_refuses_non_finite_params(run8, tmp_path, monkeypatch):
  load = loader.load_params

  def poisoned(directory, abstract, shardings):
    params = load(directory, abstract, shardings)
    return jax.tree.map(lambda a: a * np.nan, params)

  monkeypatch.setattr(loader, "load_params", poisoned)
  with pytest.raises(checkpoint.Damaged, match=r"params are not finite .*a diverged run"):
    loop.evaluate_checkpoint(str(run8))


@pytest.mark.parametrize("flag,code,message", [
    ("--config.nonexistent=1", 2, "train.py: config.nonexistent: unknown key"),
    ("--config.data.nope=1", 2, "train.py: config.data.nope: unknown key"),
    ("--config.batch_size=-5", 1, "train.py: config.batch_size: must be >= 1, got -5"),
    ("--config.lr=-1", 1, "train.py: config.lr: must be > 0, got -1.0"),
    ("--config.lr=fast", 2, "train.py: flag --config.lr=fast: could not convert"),
])
def test_config_mistakes_end_in_one_line(tmp_path, flag, code, message):
  got, err = _train(tmp_path / "w", tmp_path, flag, timeout=120)
  assert got == code and "Traceback" not in err, err[-3000:]
  assert _last_line(err).startswith(message), _last_line(err)
  assert not (tmp_path / "w").exists()  # nothing ran


def test_sigterm_ends_a_data_wait():
  stop = loop._StopSignal()  # pylint: disable=protected-access
  timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
  timer.start()
  start = time.time()
  with pytest.raises(loop._Terminated):  # pylint: disable=protected-access
    stop.interruptible(lambda: time.sleep(30))  # a data pipeline that yields nothing
  assert time.time() - start < 5 and stop.stop
  signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_sigterm_lets_a_slow_data_wait_finish():
  """A batch that comes within the grace after SIGTERM is returned (the run trains on it and
  saves as at any step): a loaded machine's slow pipeline does not lose the run's progress."""
  stop = loop._StopSignal()  # pylint: disable=protected-access
  timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGTERM))
  timer.start()
  assert stop.interruptible(lambda: time.sleep(1.0) or "batch") == "batch"
  assert stop.stop
  time.sleep(stop.GRACE_S)  # the grace's timer was cancelled: no late _Terminated
  signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_kill_9_during_saves_then_resume_equals_an_uninterrupted_run(run8, tmp_path, robust_data):
  """Saves are atomic (orbax writes a step under a temporary name, then renames it): a run
  killed while it saves every step resumes from its newest complete step, and its losses
  equal the uninterrupted run's."""
  workdir = tmp_path / "w"
  cmd = _cmd(workdir, robust_data, "--config.max_steps=6", "--config.checkpoint_every=1",
             "--config.keep=2")
  with open(tmp_path / "killed.err", "w") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=tc.REPO,
                            env=tc.env())
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "3").exists() and proc.poll() is None:
      assert time.time() < deadline
      time.sleep(0.05)
    proc.kill()
    proc.wait()
  code, err = _train(workdir, robust_data, "--config.max_steps=6", "--config.checkpoint_every=1",
                     "--config.keep=2")
  assert code == 0, err[-3000:]
  uninterrupted = tc.train_losses(tc.read_metrics(run8))
  assert tc.train_losses(tc.read_metrics(workdir)) == {s: uninterrupted[s] for s in range(1, 7)}


def test_sigterm_during_an_evaluation_saves_and_stops(tmp_path, robust_data):
  """The final evaluation (eval batch 8: 45 batches of two params sets) is cut short by
  SIGTERM: the run saves its good state, reports no evaluation and exits 0."""
  workdir = tmp_path / "w"
  cmd = _cmd(workdir, robust_data, "--config.max_steps=2", "--config.eval_batch_size=8")
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          cwd=tc.REPO, env=tc.env())
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 2/"):  # the last step is logged just before the evaluation
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, "".join(lines)[-3000:]
  out = "".join(lines)
  assert "stopping at step 2 on a termination signal; checkpoint saved" in out, out[-3000:]
  assert "eval at step 2" not in out
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
