"""Every path a user gives, in one place: a local path or a URL such as gs://bucket/dir (and the
other schemes etils.epath reads through fsspec: s3://, az://, hf://), as an etils.epath.Path.

On a TPU pod every host is its own VM: a run's workdir must be one directory that every host
sees, in practice a Cloud Storage bucket. So the workdir, init_from, data_dir, the compile
cache, the converters' files and load_model's argument all go through `resolve`:

  workdir = paths.resolve("gs://bkt/run", "--workdir")   # epath.Path; BadPath when it cannot be
  (workdir / "config.json").write_text(...)              # what the user meant

A local path is expanded (~) and made absolute. A path that cannot be what the user meant
stops with one line (BadPath, a UserError): `gs:/x` (one slash: a shell or a join ate one), an
unknown scheme, a URL without a bucket, a scheme whose filesystem is not installed, a bucket
that does not exist or cannot be reached (checked once, by `check_bucket`). Nothing here ever
makes a local folder named `gs:`.

Object stores cannot append: `Appender` keeps an appendable text file (metrics.jsonl, the
TensorBoard event files) whole in memory on a URL and rewrites it on every flush, so what was
flushed is in the bucket even if the process is killed the next moment.
"""
import contextlib
import io
import logging
import os
import re

from etils import epath

from adaptor_jax import errors

SCHEMES = ("gs", "s3", "az", "hf")  # etils.epath's URL schemes (fsspec filesystems)
_FILESYSTEMS = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(/+)(.*)$")


class BadPath(errors.UserError, ValueError):
  """A path that cannot be what the user meant, or a bucket that cannot be reached."""


def resolve(value, what="path"):
  """`value` (str or PathLike) as an epath.Path: a URL as given (trailing / dropped), a local
  path expanded and absolute. BadPath, naming `what`, for a path that cannot be meant."""
  if isinstance(value, epath.Path) and is_url(value):
    return value
  text = os.fspath(value)
  if not text:
    raise BadPath(f"{what}: empty path")
  m = _URL_RE.match(text)
  if m is None:
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  scheme, slashes, rest = m.group(1).lower(), m.group(2), m.group(3).rstrip("/")
  if scheme == "file" and len(slashes) == 3:  # file:///abs/path
    return epath.Path("/" + rest)
  if scheme not in SCHEMES:
    raise BadPath(f"{what}={text}: unknown scheme {m.group(1)}://; give a local path or a URL "
                  f"of {', '.join(s + '://' for s in SCHEMES)}")
  if slashes != "//" or not rest:
    raise BadPath(f"{what}={text}: not a {scheme}:// URL; write {scheme}://BUCKET/PATH (two "
                  "slashes, then the bucket)")
  try:
    import fsspec  # noqa: PLC0415 - epath's URL backend
    fsspec.get_filesystem_class(scheme)
  except ImportError:
    raise BadPath(f"{what}={text}: {scheme}:// needs the {_FILESYSTEMS[scheme]} package: pip "
                  f"install {_FILESYSTEMS[scheme]}") from None
  return epath.Path(f"{scheme}://{rest}")


def is_url(path):
  """Whether `path` (str or epath.Path) is a URL rather than a local path."""
  return bool(_URL_RE.match(os.fspath(path)))


def check_bucket(path, what="path"):
  """For a URL, that its bucket exists and can be read; BadPath in one line naming it. Called
  once where a run starts, so that a typo or missing credentials stop before any compute."""
  if not is_url(path):
    return
  text = os.fspath(path)
  scheme, rest = text.split("://", 1)
  bucket = f"{scheme}://{rest.split('/', 1)[0]}"
  try:
    with _quiet(scheme):
      found = epath.Path(bucket).exists()
  except Exception as e:  # noqa: BLE001 - auth, network and HTTP errors of any fsspec backend
    raise BadPath(f"{what}={text}: cannot reach {bucket} ({type(e).__name__}: "
                  f"{_first_line(e)}); check the credentials (on a TPU VM, its service "
                  "account's access to the bucket)") from None
  if not found:
    raise BadPath(f"{what}={text}: the bucket {bucket} does not exist (or these credentials "
                  f"cannot see it); create it with `gcloud storage buckets create {bucket}`")


@contextlib.contextmanager
def _quiet(scheme):
  """Keeps the filesystem's own logger from printing each retry's traceback: the failure, if
  any, is reported in one line by the caller."""
  logger = logging.getLogger(_FILESYSTEMS[scheme])
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _first_line(e):
  return (str(e).strip().splitlines() or [""])[0][:200]


def write_text(path, text):
  """Writes a whole (small) file; on a URL the object appears complete or not at all."""
  path = resolve(path)
  if not is_url(path):
    path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


class Appender:
  """A text or binary file opened for appending, on a local disk or in a bucket. Locally a plain
  append; on a URL the file's content (what is there already, then what is written) is kept in
  memory and the whole object is rewritten by `flush` (an object store has no append)."""

  def __init__(self, path, binary=False):
    self.path, self._binary = resolve(path), binary
    mode = "ab" if binary else "a"
    if not is_url(self.path):
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file, self._buffer = open(self.path, mode), None  # noqa: SIM115
      return
    self._file = None
    self._buffer = io.BytesIO() if binary else io.StringIO()
    if self.path.exists():
      self._buffer.write(self.path.read_bytes() if binary else self.path.read_text())
    self._dirty = False

  def write(self, data):
    if self._file is not None:
      self._file.write(data)
    else:
      self._buffer.write(data)
      self._dirty = True

  def flush(self):
    if self._file is not None:
      self._file.flush()
    elif self._dirty:
      value = self._buffer.getvalue()
      (self.path.write_bytes if self._binary else self.path.write_text)(value)
      self._dirty = False

  def close(self):
    self.flush()
    if self._file is not None:
      self._file.close()
