"""Every file the project reads or writes, local or in a bucket (`gs://...`), through one abstraction
(`etils.epath`, which orbax and tfds use too; gcsfs behind `gs://`), with writes that never leave a
half-written file behind.

Local paths: a write goes to a temporary file next to the target, then a POSIX rename (atomic within one
file system). Cloud URLs: a write is one object upload, and GCS makes an upload visible all at once
(readers see the whole old object or the whole new one, never a part); there is no rename, so none is used.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

from etils import epath


def is_url(path) -> bool:
  """True for `gs://bucket/...` (any `scheme://`), False for local paths."""
  return '://' in str(path)


def resolve(path: str) -> str:
  """A local path made absolute; a URL as it is (`os.path.abspath('gs://b/x')` would be a local folder
  named `gs:`)."""
  return str(path) if is_url(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
  return str(epath.Path(base).joinpath(*parts)) if is_url(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  return epath.Path(path).is_file()


def listdir(path: str) -> list[str]:
  return sorted(p.name for p in epath.Path(path).iterdir())


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def size(path: str) -> int:
  return epath.Path(path).stat().length


def remove(path: str) -> None:
  epath.Path(path).unlink()


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def move(src: str, dst: str) -> None:
  """Renames a file or folder (local: atomic; a bucket: a copy of every object, then their deletion)."""
  if is_url(src):
    import fsspec
    fs, _ = fsspec.core.url_to_fs(src)
    fs.mv(src, dst, recursive=True)
  else:
    os.rename(src, dst)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary local path next to `path`; on success renames it to `path`, on any error removes
  it. Readers see the old file or the new one, never a partial one. Local paths only."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
  if is_url(path):
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)  # one upload: visible all at once
    return
  with atomic_path(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True))


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
  """A local file with `path`'s content (itself when local; a temporary download of a URL)."""
  if not is_url(path):
    yield path
    return
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    local = os.path.join(d, os.path.basename(path))
    with open(local, 'wb') as f:
      f.write(read_bytes(path))
    yield local
