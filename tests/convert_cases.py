"""What the importer tests share (tests/test_convert*.py): a family's official key inventory
(a fixture of key -> shape, in the official order), random state dicts of those shapes, and the
exact round trips: in memory, through the converter's directory and through its command line."""
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
from etils import epath
from flax import nnx

from adaptor_jax.models import registry

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def abstract(name, **overrides):
  """Preset `name` built abstractly (no weights: a converter fills it)."""
  return nnx.eval_shape(lambda: registry.create_model(name, rngs=nnx.Rngs(0), **overrides))


def official_shapes(fixture):
  """{official key: shape} of tests/fixtures/`fixture`, in its order."""
  with open(os.path.join(FIXTURES, fixture)) as f:
    return {k: tuple(v) for k, v in json.load(f).items()}


def random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def assert_layout_is(family, model, shapes):
  """family.layout(model) gives exactly `shapes` (keys, order, shapes), one key per param."""
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  entries = family.layout(model)
  ours = {key: tuple(jax.eval_shape(to_theirs, params[path].get_value()).shape)
          for key, path, (_, to_theirs) in entries}
  assert list(ours.items()) == list(shapes.items())  # same keys, order and shapes
  paths = [path for _, path, _ in entries]
  assert len(set(paths)) == len(paths) == len(params)  # every param has exactly one key


def assert_same(got, want):
  """Two state dicts with the same keys in the same order and equal arrays."""
  assert list(got) == list(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def assert_round_trips(family, name, state_dict, directory):
  """state_dict -> preset `name` -> state_dict, in memory and through family.save / restore."""
  model = abstract(name)
  family.from_state_dict(model, state_dict)
  assert_same(family.to_state_dict(model), state_dict)
  family.save(model, name, directory)
  assert_same(family.to_state_dict(family.restore(directory)), state_dict)


def command_line(family, preset, state_dict, root):
  """`python -m <family> --checkpoint=in.npz --model=preset --output=ours`, then `--export` of
  ours to out.npz, which must equal `state_dict`; all three under `root`, a directory or a
  bucket URL. Returns the directory the import wrote."""
  def run(*args):
    done = subprocess.run([sys.executable, "-m", family.__name__, *args], check=False,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
  root = epath.Path(root)
  buffer = io.BytesIO()
  np.savez(buffer, **state_dict)
  (root / "in.npz").write_bytes(buffer.getvalue())
  ours = root / "ours"
  run(f"--checkpoint={root / 'in.npz'}", f"--model={preset}", f"--output={ours}")
  run("--export", f"--input={ours}", f"--checkpoint={root / 'out.npz'}")
  with np.load(io.BytesIO((root / "out.npz").read_bytes())) as out:
    assert sorted(out.files) == sorted(state_dict)
    for k in state_dict:
      np.testing.assert_array_equal(out[k], state_dict[k], err_msg=k)
  return ours
