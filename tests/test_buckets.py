"""A run that lives in a bucket, as on a Cloud TPU pod: train.py with its workdir and data in
gs://, killed and resumed; eval.py, load_model and init_from reading it from fresh processes; a
damaged checkpoint there; two processes writing one checkpoint and resuming; a job that loses a
process. All against a real GCS server on 127.0.0.1 (fake-gcs-server, tests/gcs_server.py),
reached through the libraries' own emulator variables; the runs are tests/configs/tiny.py and
compare with the uninterrupted local run `run8` (conftest.py), whose programs they share."""
import json
import os
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import portpicker
import pytest
from etils import epath
from flax import nnx

import train_cases as tc
from adaptor_jax import paths
from adaptor_jax.training import hosts, loader


@pytest.fixture(scope="module")
def bucket(gcs):
  return gcs.bucket("runs")


@pytest.fixture(scope="module")
def bucket_data(bucket):
  """The digits dataset built straight into the bucket (builders: locally, then copied)."""
  from adaptor_jax.data import builders  # noqa: PLC0415
  builders.build_digits(f"{bucket}/tfds")
  return f"{bucket}/tfds"


@pytest.fixture(scope="module")
def cache(robust_data):
  return robust_data.parent / "xla_cache"  # run8's programs


def _cmd(workdir, data_dir, cache, *flags):
  return tc.train_cmd(workdir, data_dir, cache, *flags)


def _last_line(text):
  return text.strip().splitlines()[-1]


def _read(url):
  return epath.Path(url).read_text()


def _metrics(workdir):
  return [json.loads(line) for line in _read(f"{workdir}/metrics.jsonl").splitlines() if line]


def _committed(workdir, step):
  """Whether checkpoint `step` of a bucket workdir is complete (orbax's commit marker)."""
  return epath.Path(f"{workdir}/checkpoints/{step}/commit_success.txt").exists()


def _wait(condition, proc, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


# ------------------------------------------------------------------------------------------------
# Paths


def test_paths_that_cannot_be_meant_stop_in_one_line(gcs, bucket):
  for bad, message in [("gs:/runs/x", "gs:/runs/x: not a gs:// URL; write gs://BUCKET/PATH"),
                       ("gs://", "gs://: not a gs:// URL"),
                       ("gcs://runs/x", "gcs://runs/x: unknown scheme gcs://; give a local path"),
                       ("", "empty path")]:
    with pytest.raises(paths.BadPath) as e:
      paths.resolve(bad, "--workdir")
    assert str(e.value).startswith("--workdir" + ("=" if bad else ": ")), str(e.value)
    assert message in str(e.value) and "\n" not in str(e.value)
  assert str(paths.resolve("gs://runs/x/")) == "gs://runs/x"
  assert str(paths.resolve("~/x")) == os.path.expanduser("~/x")
  assert str(paths.resolve("file:///tmp/x")) == "/tmp/x"
  paths.check_bucket(f"{bucket}/anything")
  with pytest.raises(paths.BadPath, match="the bucket gs://nobucket does not exist"):
    paths.check_bucket("gs://nobucket/run", "--workdir")


def test_appender_keeps_what_was_there_and_each_flush_is_in_the_bucket(bucket):
  url = f"{bucket}/appender/metrics.jsonl"
  first = paths.Appender(url)
  first.write("a\n")
  first.flush()
  assert _read(url) == "a\n"  # flushed: there even if the process dies now
  first.write("b\n")
  first.close()
  second = paths.Appender(url)  # a resumed run appends
  second.write("c\n")
  second.close()
  assert _read(url) == "a\nb\nc\n"


def test_a_workdir_that_cannot_be_meant_makes_nothing(tmp_path, robust_data, cache):
  """`--workdir=gs:/...` (a slash lost) ends in one line before any compute, and no folder named
  gs: appears (before, it trained and then failed at its first checkpoint)."""
  done = subprocess.run(_cmd("gs:/runs/demo", robust_data, cache), capture_output=True,
                        text=True, cwd=tmp_path, env=tc.env(), timeout=300, check=False)
  assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert _last_line(done.stderr) == ("train.py: --workdir=gs:/runs/demo: not a gs:// URL; write "
                                     "gs://BUCKET/PATH (two slashes, then the bucket)")
  assert os.listdir(tmp_path) == []


def test_the_compile_cache_may_be_a_bucket(bucket):
  """config.compile_cache=gs://...: jax's persistent cache writes its entries there (on a pod,
  one cache that every host reads)."""
  script = ("from adaptor_jax.training import config as config_lib, loop\n"
            "import jax, sys\n"
            "c = config_lib.default_config()\n"
            "c.num_classes, c.compile_cache = 10, sys.argv[1]\n"
            "loop.setup(c)\n"
            "print(jax.jit(lambda x: x * 3 + 1)(2.0))\n")
  done = subprocess.run([sys.executable, "-c", script, f"{bucket}/xla"], capture_output=True,
                        text=True, env=tc.env(), timeout=300, check=False)
  assert done.returncode == 0 and _last_line(done.stdout) == "7.0", done.stderr[-3000:]
  assert any("jit__lambda" in p.name for p in epath.Path(f"{bucket}/xla").iterdir())


# ------------------------------------------------------------------------------------------------
# The tiny demo in the bucket: killed, resumed, read back.


@pytest.fixture(scope="module")
def resumed(bucket, bucket_data, cache, tmp_path_factory):
  """The tiny demo with its workdir and data in the bucket, 6 steps saving every step: killed
  (kill -9) once checkpoint 3 is in the bucket, then the same command again. Each run has an
  empty current directory, HOME and TMPDIR of its own (`local`), to see what it writes there."""
  workdir, logs = f"{bucket}/demo", tmp_path_factory.mktemp("resumed_logs")
  local = tmp_path_factory.mktemp("resumed_local")
  for d in ("cwd", "home", "tmp"):
    (local / d).mkdir()
  env = dict(tc.env(), HOME=str(local / "home"), TMPDIR=str(local / "tmp"))
  cmd = _cmd(workdir, bucket_data, cache, "--config.max_steps=6", "--config.checkpoint_every=1",
             "--config.keep=2")
  with open(logs / "killed.err", "w") as err:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=local / "cwd",
                            env=env)
    _wait(lambda: _committed(workdir, 3), proc)
    proc.kill()
    proc.wait()
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=local / "cwd", env=env,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return dict(workdir=workdir, local=local, out=done.stdout, err=done.stderr)


def test_a_killed_bucket_run_resumes_with_the_uninterrupted_losses(resumed, run8):
  assert f"workdir {resumed['workdir']}: resumed from step " in resumed["out"]
  uninterrupted = tc.train_losses(tc.read_metrics(run8))
  assert tc.train_losses(_metrics(resumed["workdir"])) == {s: uninterrupted[s]
                                                           for s in range(1, 7)}
  assert json.loads(_read(f"{resumed['workdir']}/config.json"))["max_steps"] == 6
  assert json.loads(_read(f"{resumed['workdir']}/params.json"))["params"] > 0


def _tensorboard_scalars(directory):
  """{(tag, step): value} of every event file in `directory` (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2  # noqa: PLC0415
  scalars = {}
  for f in epath.Path(directory).iterdir():
    data, at = f.read_bytes(), 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars


def test_tensorboard_events_in_the_bucket_hold_the_logged_values(resumed):
  """Every value of metrics.jsonl is in the event files (both runs' files; rates, which differ
  between the runs for the steps logged twice, aside)."""
  scalars = _tensorboard_scalars(f"{resumed['workdir']}/tensorboard")
  checked = 0
  for m in _metrics(resumed["workdir"]):
    for key, value in m.items():
      if key not in ("step", "train/images_per_s", "eval/images_per_s"):
        assert scalars[(key, m["step"])] == pytest.approx(value, rel=1e-6), (key, m["step"])
        checked += 1
  assert checked > 6 * 5, checked


def test_nothing_but_caches_is_written_locally(resumed):
  """The runs' current directory, HOME and TMPDIR stay empty (the compilation cache is given)."""
  left = [os.path.join(root, f) for d in ("cwd", "home", "tmp")
          for root, _, files in os.walk(resumed["local"] / d) for f in files]
  assert left == []


def test_eval_and_load_model_read_the_bucket_run_in_fresh_processes(resumed, tmp_path):
  """eval.py on the bucket workdir gives the run's own last evaluation; load_model in a fresh
  process gives the params of the same checkpoint copied to a local disk."""
  workdir = resumed["workdir"]
  done = subprocess.run([sys.executable, os.path.join(tc.REPO, "eval.py"),
                         f"--workdir={workdir}"], capture_output=True, text=True, env=tc.env(),
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(_last_line(done.stdout))
  logged = [m for m in _metrics(workdir) if "eval/top1" in m][-1]
  assert logged["step"] == 6
  for key in ("top1", "top5", "raw_top1", "ema_top1", "n"):
    assert got[key] == logged[f"eval/{key}"], key

  script = ("import sys, numpy as np, adaptor_jax\n"
            "from flax import nnx\n"
            "import train_cases as tc\n"
            "model, config = adaptor_jax.load_model(sys.argv[1])\n"
            "np.savez(sys.argv[2], **tc.flat(nnx.to_pure_dict(nnx.state(model, nnx.Param))))\n")
  done = subprocess.run([sys.executable, "-c", script, workdir, tmp_path / "from_bucket.npz"],
                        capture_output=True, text=True, env=tc.env(), timeout=300, check=False,
                        cwd=os.path.join(tc.REPO, "tests"))
  assert done.returncode == 0, done.stderr[-3000:]
  local = tmp_path / "6"
  _copy_tree(f"{workdir}/checkpoints/6", local)
  model, _ = loader.load_model(local)
  want = tc.flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  with np.load(tmp_path / "from_bucket.npz") as got:
    assert sorted(got.files) == sorted(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _copy_tree(src, dst):
  """Copies the objects under gs:// URL `src` to the local path or URL `dst`."""
  import fsspec  # noqa: PLC0415
  fs = fsspec.filesystem("gs")
  for key in fs.find(src):
    target = epath.Path(dst) / key[len(src) - len("gs://") + 1:]
    if not paths.is_url(target):
      target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(fs.cat_file(key))


def test_init_from_a_bucket_run(resumed):
  """config.init_from=gs://... loads every param of the run (its EMA) into a new run's state."""
  from adaptor_jax.training import init_from, optimizer, sharding, steps  # noqa: PLC0415
  config = loader.read_config(loader.find(resumed["workdir"]))
  config.init_from = resumed["workdir"]
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  made = steps.make_net(config, config.num_classes)
  tx = optimizer.make(config, 44, trainable=made[2])
  _, state, shardings = steps.create(config, config.num_classes, mesh, tx, made)
  started = init_from.apply(state, shardings, config, f"{resumed['workdir']}-next")
  model, _ = loader.load_model(resumed["workdir"])
  want = tc.flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  got = tc.flat(started["params"])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  report = json.loads(_read(f"{resumed['workdir']}-next/init_from.json"))
  assert report["loaded"] == len(want) and report["kept_at_init"] == []


def test_a_damaged_checkpoint_in_the_bucket_falls_back(resumed, bucket, bucket_data, cache, run8):
  """A chunk of the newest checkpoint's params deleted from the bucket: the restart names it,
  sets the step aside as 6.damaged, resumes from 5 and trains step 6 again, as on a disk."""
  workdir = f"{bucket}/damaged"
  _copy_tree(resumed["workdir"], workdir)
  chunks = sorted(epath.Path(f"{workdir}/checkpoints/6/params/ocdbt.process_0/d").iterdir(),
                  key=lambda p: -p.stat().length)
  chunks[0].unlink()
  done = subprocess.run(_cmd(workdir, bucket_data, cache, "--config.max_steps=6",
                             "--config.checkpoint_every=1", "--config.keep=2"),
                        capture_output=True, text=True, env=tc.env(), timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"checkpoint {workdir}/checkpoints/6/params cannot be read" in done.stderr
  assert f"workdir {workdir}: resumed from step 5" in done.stdout
  steps = sorted(p.name for p in epath.Path(f"{workdir}/checkpoints").iterdir())
  assert steps == ["5", "6", "6.damaged"], steps
  assert tc.train_losses(_metrics(workdir))[6] == tc.train_losses(tc.read_metrics(run8))[6]


# ------------------------------------------------------------------------------------------------
# Two processes (jax.distributed on CPU, gloo collectives), one workdir in the bucket.


def _start_two(workdir, data_dir, cache, log_dir, tag, *flags):
  """train.py as processes 0 and 1 of one job on localhost; (Popens, log paths)."""
  port = portpicker.pick_unused_port()
  procs, logs = [], []
  for i in range(2):
    cmd = _cmd(workdir, data_dir, cache, f"--coordinator_address=localhost:{port}",
               "--num_processes=2", f"--process_id={i}", *flags)
    out, err = log_dir / f"{tag}{i}.out", log_dir / f"{tag}{i}.err"
    with open(out, "w") as o, open(err, "w") as e:
      procs.append(subprocess.Popen(cmd, stdout=o, stderr=e, cwd=tc.REPO, env=tc.env()))
    logs.append((out, err))
  return procs, logs


def _wait_all(procs, timeout=540):
  """Waits for every process; when one fails or time runs out, stops the others."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs) or time.time() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs]


def _assert_matches_one_process(workdir, run8, steps):
  """The two processes' losses, gradient norms and rates against the one-process run: the
  all-reduce sums in another order (seen: relative differences <= 1e-6)."""
  ref = {m["step"]: m for m in tc.read_metrics(run8) if "train/loss" in m}
  got = {m["step"]: m for m in _metrics(workdir) if "train/loss" in m}
  assert sorted(got) == list(steps)
  for step in steps:
    for key in ("train/loss", "train/grad_norm", "train/lr"):
      np.testing.assert_allclose(got[step][key], ref[step][key], rtol=1e-5,
                                 err_msg=f"{key} {step}")


def test_two_processes_write_one_checkpoint_into_the_bucket_and_resume(
    bucket, bucket_data, cache, run8, tmp_path):
  """2 processes on localhost, each reading half of the global batch of 32: process 0 alone
  logs and writes metrics, each writes its data iterator's state into the one checkpoint in
  the bucket; the same job started again resumes from it. Both match one process."""
  workdir = f"{bucket}/two"
  procs, logs = _start_two(workdir, bucket_data, cache, tmp_path, "a", "--config.max_steps=4")
  assert _wait_all(procs) == [0, 0], [tc.tail(err) for _, err in logs]
  assert "mesh {'data': 2, 'fsdp': 1}" in logs[0][0].read_text()
  assert "step 1/" not in logs[1][0].read_text()
  saved = [p.name for p in epath.Path(f"{workdir}/checkpoints/4/data").iterdir()]
  assert sorted(f for f in saved if f.startswith("process_")) == [
      "process_0-of-2.json", "process_1-of-2.json"]

  procs, logs = _start_two(workdir, bucket_data, cache, tmp_path, "b", "--config.max_steps=6")
  assert _wait_all(procs) == [0, 0], [tc.tail(err) for _, err in logs]
  assert "from step 4" in logs[0][0].read_text()
  _assert_matches_one_process(workdir, run8, range(1, 7))


def test_a_lost_process_ends_the_job_in_one_line_and_a_restart_resumes(
    bucket, bucket_data, cache, run8, tmp_path):
  """kill -9 of process 1 mid-run: process 0 exits 75 within config.host_timeout_s (10 here)
  plus a heartbeat, with one line naming the newest checkpoint. kill -9 of process 0, the
  coordinator: the runtime ends process 1 within seconds, without Python's fault dump. Then the
  same command on both resumes and finishes with the one-process losses."""
  workdir, timeout = f"{bucket}/lost", 10
  flags = ("--config.max_steps=8", "--config.checkpoint_every=1", "--config.keep=2",
           f"--config.host_timeout_s={timeout}")
  procs, logs = _start_two(workdir, bucket_data, cache, tmp_path, "a", *flags)
  _wait(lambda: _committed(workdir, 3), procs[0])
  procs[1].kill()
  killed = time.time()
  code = procs[0].wait(timeout=120)
  seconds = time.time() - killed
  procs[1].wait()
  err = logs[0][1].read_text()
  print(f"process 1 lost: process 0 exited {code} after {seconds:.1f} s")
  assert code == hosts.LOST_EXIT_CODE, err[-3000:]
  assert seconds < timeout + 2.5 + 10, seconds  # + a heartbeat, + 5 s to name the newest step
  line = _last_line(err)
  assert line.startswith(f"train.py: the job lost process 1 of 2 (no heartbeat for {timeout} s);"
                         " the newest checkpoint is step "), line
  assert f" in {workdir}/checkpoints; this process stops too" in line, line
  assert "Traceback" not in err and "Fatal Python error" not in err

  procs, logs = _start_two(workdir, bucket_data, cache, tmp_path, "b", *flags)
  resumed = int(line.split("the newest checkpoint is step ")[1].split()[0])
  _wait(lambda: _committed(workdir, resumed + 1), procs[0])
  procs[0].kill()
  killed = time.time()
  code = procs[1].wait(timeout=120)
  seconds = time.time() - killed
  err = logs[1][1].read_text()
  print(f"process 0 lost: process 1 exited {code} after {seconds:.1f} s")
  assert code != 0 and seconds < 10, (code, seconds, err[-3000:])
  assert "another task died" in err and "Fatal Python error" not in err, err[-3000:]

  procs, logs = _start_two(workdir, bucket_data, cache, tmp_path, "c", *flags)
  assert _wait_all(procs) == [0, 0], [tc.tail(err) for _, err in logs]
  assert "from step " in logs[0][0].read_text()
  _assert_matches_one_process(workdir, run8, range(1, 9))
