"""One writer per workdir: a training process holds an exclusive lease on its workdir for its whole life.

`WORKDIR/.lease` (JSON: host, pid, started, renewed) is held with an OS file lock (`fcntl.flock`), which the kernel
releases when the holder dies, so a restart after `kill -9` takes it at once. A second training process on a held
workdir is refused in one line naming the holder (exit 2 on the command line) before it writes anything.
Multi-process runs share one lease: process 0 holds it. Evaluation, export and sampling take no lease.
A `gs://` workdir has no file locks: it is not leased in this version (its runs must not share a workdir).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

from ttq_jax import files
from ttq_jax.errors import ConfigError

LEASE_FILE = '.lease'


class Lease:
  """The exclusive lease of this process on `workdir` (a context manager; `acquire` / `release`)."""

  def __init__(self, workdir: str):
    self.workdir, self.path, self._fd = workdir, files.join(workdir, LEASE_FILE), None

  def acquire(self) -> 'Lease':
    """Takes the lease, or raises ConfigError naming its holder; writes nothing else."""
    if files.is_url(self.workdir):
      return self
    files.makedirs(self.workdir)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise ConfigError(f'workdir {self.workdir} is being trained by another process (host {holder.get("host", "?")}, '
                        f'pid {holder.get("pid", "?")}, since {holder.get("started", "?")}): one training process per '
                        'workdir; use another --workdir or stop that run') from None
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    record = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'started': now, 'renewed': now})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False


def _read(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode() or '{}')
  except ValueError:
    return {}
