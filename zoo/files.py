"""Atomic writes: a file appears whole under its name or not at all, whatever kills the process.

Everything the zoo writes outside Orbax (whose commit is atomic itself) goes through here: the
content is written to a temporary file beside the target, flushed to disk, then renamed over it
(`os.replace` is atomic on POSIX). A failed write (a full disk, no permission) raises an OSError
naming the target and leaves the previous file, if any, untouched.
"""

import contextlib
import os
import tempfile

# mkstemp makes owner-only (0600) files; the renamed file gets what `open` would have given it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path beside `path`; on a clean exit it is renamed to `path`.

  For writers that take a file name (safetensors, PIL). On an exception the temporary file is
  removed and `path` keeps its old content.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=directory)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
  except OSError as e:
    _remove(tmp)
    raise OSError(e.errno, f'could not write {path}: {e.strerror or e}') from e
  except BaseException:
    _remove(tmp)
    raise


@contextlib.contextmanager
def atomic_open(path, mode='w'):
  """`open(path, mode)` ('w' or 'wb') that only replaces `path` once the block succeeds."""
  if mode not in ('w', 'wb'):
    raise ValueError(f'atomic_open writes whole files: mode must be w or wb, got {mode!r}')
  with atomic_path(path) as tmp, open(tmp, mode) as f:
    yield f


def write_text(path, text):
  """Writes `text` to `path` atomically."""
  with atomic_open(path) as f:
    f.write(text)


def _remove(path):
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)
