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


# --------------------------------------------------------------------------- conditional writes (gs:// only)
# Exactly one of several writers succeeds: object generations as preconditions (`ifGenerationMatch`) on a
# multipart upload, which GCS (and fake-gcs-server) enforce; a failed precondition is gcsfs's FileExistsError.


def _gcs():
  import fsspec  # noqa: PLC0415 - a third-party filesystem, loaded for buckets only
  return fsspec.filesystem('gs')


def _upload_if(path: str, data: bytes, generation: int) -> int | None:
  from urllib.parse import quote  # noqa: PLC0415
  fs = _gcs()
  bucket, key, _ = fs.split_path(path)
  body = (b'--==0==\nContent-Type: application/json; charset=UTF-8\n\n' + json.dumps({'name': key}).encode()
          + b'\n--==0==\nContent-Type: application/octet-stream\n\n' + data + b'\n--==0==--')
  try:
    out = fs.call('POST', f'{fs._location}/upload/storage/v1/b/{quote(bucket)}/o', uploadType='multipart',
                  headers={'Content-Type': 'multipart/related; boundary="==0=="'}, data=body, json_out=True,
                  ifGenerationMatch=str(generation))
  except FileExistsError:  # HTTP 412: the object's generation is not `generation`
    return None
  finally:
    fs.invalidate_cache(path)
  return int(out['generation'])


def create_exclusive(path: str, data: bytes) -> int | None:
  """Creates the object `path` (a gs:// URL) unless it exists: its generation, or None when it existed."""
  return _upload_if(path, data, 0)


def replace_if_generation(path: str, data: bytes, generation: int) -> int | None:
  """Replaces the object `path` if its generation is still `generation`: the new generation, else None."""
  return _upload_if(path, data, generation)


def read_with_generation(path: str) -> tuple[bytes, int, str] | None:
  """(contents, generation, last update time as GCS records it) of the object `path`; None if it does not exist."""
  fs = _gcs()
  fs.invalidate_cache(path)
  try:
    info = fs.info(path)  # (contents read after: a newer generation's, at worst; a replace conditional on this fails)
    return fs.cat_file(path), int(info['generation']), str(info.get('updated', ''))
  except FileNotFoundError:
    return None
