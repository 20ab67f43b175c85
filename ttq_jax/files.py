"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to `path`; on success renames it to `path` (POSIX rename is atomic
  within one file system), on any error removes it. Readers see the old file or the new one, never a
  partial one."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True))
