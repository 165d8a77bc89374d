"""notebooks/quickstart.ipynb executed as a user's Jupyter runs it: nbclient, a fresh kernel, the
Quick start's environment (no libtpu: tc.without_libtpu), on `run8` (conftest.py) instead of the
demo's /tmp/demo."""
import os
import re

import nbclient
import nbformat

import adaptor_jax
import train_cases as tc
from adaptor_jax.data import builders

NOTEBOOK = os.path.join(tc.REPO, "notebooks", "quickstart.ipynb")


def test_the_quickstart_notebook_classifies_the_held_out_digits(run8, tmp_path, monkeypatch):
  env = tc.without_libtpu(tmp_path)
  for name in set(os.environ) - set(env):
    monkeypatch.delenv(name)
  for name, value in dict(env, ADAPTOR_JAX_WORKDIR=str(run8)).items():
    monkeypatch.setenv(name, value)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()

  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
  assert stderr == [], stderr  # no warnings, no libtpu noise
  text = "".join(o.text for o in outputs if o.output_type == "stream")
  assert "mamba_adaptor_b1 on digits - classes: 0 1 2 3 4 5 6 7 8 9" in text, text
  right = int(re.search(r"(\d+) of 360 held-out digits right", text).group(1))
  images, labels, _, held_out = builders.digits_arrays()
  clf = adaptor_jax.load_classifier(run8)
  want = sum(p[0][0] == str(y) for p, y in zip(clf.predict(images[held_out]), labels[held_out]))
  assert abs(right - want) <= 1, (right, want)  # another process: logits to float rounding
  assert any("image/png" in o.get("data", {}) for o in outputs)  # the picture of the digits
