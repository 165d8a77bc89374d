"""What the command lines print (adaptor_jax/commands.py), as a user meets them: each mistake
through train.py, eval.py, the builders, a converter and summary ends in one line on stderr
with its exit code; a run's console holds its start lines, progress and evaluations, once each;
a finished run started again says it is complete; and after the Quick start's install (no
libtpu) using the model prints nothing."""
import os
import subprocess
import sys

import pytest

import train_cases as tc

PY = sys.executable
TRAIN, EVAL = os.path.join(tc.REPO, "train.py"), os.path.join(tc.REPO, "eval.py")
B2 = os.path.join(tc.REPO, "configs", "b2.py")
TRANSFER = os.path.join(tc.REPO, "configs", "transfer.py")


def _run(cmd, cwd, env=None):
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env or tc.env(),
                        timeout=300, check=False)
  return done.returncode, done.stdout, done.stderr


# (command, exit code, the one line on stderr), {tmp} the test's directory
MISTAKES = {
    "dataset_not_prepared": (
        [PY, TRAIN, f"--config={B2}", "--workdir={tmp}/w", "--config.data.data_dir={tmp}"], 1,
        "train.py: Dataset 'imagenet2012' is not prepared in {tmp}. Prepare it once: put "
        "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {tmp}/downloads/manual/"),
    "no_such_data_dir": (
        [PY, TRAIN, f"--config={B2}", "--workdir={tmp}/w", "--config.data.data_dir={tmp}/no"],
        1, "train.py: config.data.data_dir='{tmp}/no' does not exist. Prepare it once"),
    "bad_config_arg": (
        [PY, TRAIN, f"--config={TRANSFER}:cifar10", "--workdir={tmp}/w"], 2,
        "train.py: configs/transfer.py:cifar10: want DATASET,METHOD with DATASET one of"),
    "no_such_config": (
        [PY, TRAIN, "--config={tmp}/b3.py", "--workdir={tmp}/w"], 2,
        "train.py: --config: no such file {tmp}/b3.py"),
    "bad_config_type": (
        [PY, TRAIN, f"--config={B2}", "--workdir={tmp}/w", "--config.batch_size=abc"], 2,
        "train.py: flag --config.batch_size=abc: invalid literal for int()"),
    "no_checkpoint": (
        [PY, EVAL, "--workdir={tmp}"], 1,
        "eval.py: {tmp}: not a training workdir (with checkpoints/), a checkpoint step directory"),
    "no_source_archive": (
        [PY, "-m", "adaptor_jax.data.builders", "--dataset=cifar100",
         "--source={tmp}/cifar-100-python.tar.gz", "--data_dir={tmp}"], 1,
        "adaptor_jax.data.builders: CIFAR-100 archive '{tmp}/cifar-100-python.tar.gz' does not "
        "exist."),
    "no_dataset_flag": (
        [PY, "-m", "adaptor_jax.data.builders"], 2,
        "adaptor_jax.data.builders: --dataset is required: one of digits, image_folder"),
    "no_file_to_convert": (
        [PY, "-m", "adaptor_jax.convert.vmamba", "--checkpoint={tmp}/vssm.npz",
         "--model=vmamba_tiny", "--output={tmp}/out"], 1,
        "adaptor_jax.convert.vmamba: {tmp}/vssm.npz: no such file"),
    "foreign_file_to_convert": (
        [PY, "-m", "adaptor_jax.convert.vmamba", "--checkpoint={tmp}/notes.npz",
         "--model=vmamba_tiny", "--output={tmp}/out"], 1,
        "adaptor_jax.convert.vmamba: {tmp}/notes.npz: not an .npz (not a zip archive of .npy "
        "arrays)"),
    "unknown_model": (
        [PY, "-m", "adaptor_jax.summary", "--model=vmamba_huge"], 2,
        "adaptor_jax.summary: --model=vmamba_huge: not a preset; one of"),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_each_mistake_ends_in_one_line(case, tmp_path):
  cmd, code, line = MISTAKES[case]
  (tmp_path / "notes.npz").write_text("not an archive\n")
  got, _, err = _run([a.format(tmp=tmp_path) for a in cmd], tmp_path)
  assert got == code and len(err.splitlines()) == 1, err[-3000:]
  assert err.startswith(line.format(tmp=tmp_path)), err


def test_a_run_prints_its_start_progress_and_evaluations_once(tmp_path, robust_data):
  """The tiny demo's console: the start lines (model, params, mesh, dataset and where it is;
  workdir and step), one progress line per step, the evaluation; nothing on stderr (the
  libraries' INFO logging is off). Started again once finished, it says so and trains nothing."""
  cmd = tc.train_cmd(tmp_path / "w", robust_data, robust_data.parent / "xla_cache",
                     "--config.max_steps=2")
  code, out, err = _run(cmd, tmp_path)
  assert code == 0 and err == "", err[-3000:]
  lines = out.splitlines()
  assert lines[0].startswith("mamba_adaptor_b1: ") and " params, all trained; mesh {'data': 1, "
  assert f"; digits from {robust_data}/digits/1.0.0: 1437 training images, 44 steps/epoch, " \
         "132 steps" in lines[0], lines[0]
  assert lines[1] == f"workdir {tmp_path / 'w'}: step 0"
  assert [line.split(" |")[0] for line in lines[2:4]] == ["step 1/132", "step 2/132"]
  assert lines[4].startswith("eval at step 2: top-1 ") and lines[4].endswith(", 360 images")
  assert " (raw " in lines[4] and len(lines) == 5, out

  code, out, err = _run(cmd, tmp_path)
  assert code == 0 and err == "", err[-3000:]
  assert out.splitlines()[1] == (
      f"workdir {tmp_path / 'w'}: complete at step 2 of 2; nothing to train (raise "
      "config.max_steps or config.epochs to go on; eval.py evaluates it)"), out
  assert len(out.splitlines()) == 2


def test_after_the_quick_start_install_the_model_prints_nothing(tmp_path):
  """The Quick start installs no libtpu (the test extras do): jax finds no TPU runtime and says
  nothing (tc.without_libtpu)."""
  script = ("import jax.numpy as jnp, adaptor_jax\n"
            "from flax import nnx\n"
            "m = adaptor_jax.create_model('mamba_adaptor_b1', num_classes=10, rngs=nnx.Rngs(0),"
            " dims=(8,), depths=(1,))\n"
            "assert m(jnp.zeros((1, 16, 16, 3))).shape == (1, 10)\n")
  code, out, err = _run([PY, "-c", script], tmp_path, env=tc.without_libtpu(tmp_path))
  assert code == 0 and out == "" and err == "", (out + err)[-3000:]
