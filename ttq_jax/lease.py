"""One writer per workdir: a training process holds an exclusive lease on its workdir for its whole life.

`WORKDIR/.lease` (JSON: host, pid, started, renewed) names the holder. A second training process on a held workdir
is refused in one line naming the holder (exit 2 on the command line) before it writes anything. Multi-process runs
share one lease: process 0 holds it. Evaluation, export and sampling take no lease.

- Local workdirs: an OS file lock (`fcntl.flock`) on the file, which the kernel releases when the holder dies, so a
  restart after `kill -9` takes it at once; a held lock always means a live holder (`take_over_lease` cannot
  take it).
- gs:// workdirs: the object is created with the precondition `ifGenerationMatch=0` (only one creator succeeds),
  renewed every `lease_renew_s` by a replace conditional on the holder's own generation, and expired when not
  renewed for `lease_timeout_s` (by the bucket's update time): then the next run takes it over with a warning, by a
  replace conditional on the stale generation (one taker succeeds). `take_over_lease=True` takes a live-looking
  one on purpose. A holder whose renewal finds another generation has lost the lease: `check` (before every
  checkpoint save) stops it without saving.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import threading

from ttq_jax import files
from ttq_jax.errors import ConfigError

LEASE_FILE = '.lease'
RENEW_S, TIMEOUT_S = 30.0, 120.0  # the config's defaults (lease_renew_s, lease_timeout_s)


def _now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def _holder(holder: dict) -> str:
  return f'host {holder.get("host", "?")}, pid {holder.get("pid", "?")}, since {holder.get("started", "?")}'


def _refusal(workdir: str, holder: dict, extra: str = '') -> ConfigError:
  return ConfigError(f'workdir {workdir} is being trained by another process ({_holder(holder)}{extra}): one training '
                     'process per workdir; use another --workdir or stop that run')


class Lease:
  """The exclusive lease of this process on `workdir` (a context manager; `acquire` / `check` / `release`)."""

  def __init__(self, workdir: str, *, renew_s: float = RENEW_S, timeout_s: float = TIMEOUT_S, take_over: bool = False):
    self.workdir, self.path = workdir, files.join(workdir, LEASE_FILE)
    self.renew_s, self.timeout_s, self.take_over = float(renew_s), float(timeout_s), bool(take_over)
    self._fd = None                      # local: the locked file
    self._generation = None              # gs://: the generation this process wrote last
    self._stop, self._thread, self.lost = threading.Event(), None, None  # lost: the holder that took it from us
    self._started = _now().isoformat(timespec='seconds')

  @classmethod
  def for_config(cls, workdir: str, config) -> 'Lease':
    return cls(workdir, renew_s=config.lease_renew_s, timeout_s=config.lease_timeout_s, take_over=config.take_over_lease)

  def _record(self) -> bytes:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'started': self._started,
                       'renewed': _now().isoformat(timespec='seconds')}).encode()

  def acquire(self) -> 'Lease':
    """Takes the lease, or raises ConfigError naming its holder; writes nothing else."""
    return self._acquire_remote() if files.is_url(self.workdir) else self._acquire_local()

  def _acquire_local(self) -> 'Lease':
    files.makedirs(self.workdir)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_fd(fd)
      os.close(fd)
      raise _refusal(self.workdir, holder, '; a local lease is held by a live process, which take_over_lease cannot '
                     'take' if self.take_over else '') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, self._record(), 0)
    self._fd = fd
    return self

  def _acquire_remote(self) -> 'Lease':
    generation = files.create_exclusive(self.path, self._record())
    if generation is None:
      found = files.read_with_generation(self.path)
      if found is None:  # released between our create and our read: one more try
        generation = files.create_exclusive(self.path, self._record())
        if generation is None:
          raise _refusal(self.workdir, {})
      else:
        data, stale, updated = found
        holder = _parse(data)
        age = (_now() - datetime.datetime.fromisoformat(updated.replace('Z', '+00:00'))).total_seconds() if updated \
            else float('inf')
        if age <= self.timeout_s and not self.take_over:
          raise _refusal(self.workdir, holder, f'; renewed {age:.0f} s ago, taken over after lease_timeout_s='
                         f'{self.timeout_s:g} s without renewal, or now with --config.take_over_lease=true')
        generation = files.replace_if_generation(self.path, self._record(), stale)
        if generation is None:
          raise _refusal(self.workdir, self._holder_now(), '; it took the lease over at the same time as this one')
        why = 'take_over_lease=true' if age <= self.timeout_s else f'not renewed for {age:.0f} s > lease_timeout_s'
        logging.warning('took over the lease of workdir %s from %s (%s)', self.workdir, _holder(holder), why)
    self._generation = generation
    self._thread = threading.Thread(target=self._renew_loop, name='lease-renewal', daemon=True)
    self._thread.start()
    return self

  def _renew_loop(self) -> None:
    while not self._stop.wait(self.renew_s):
      self.renew()

  def renew(self) -> bool:
    """gs://: extends the lease (a replace conditional on our generation); False, and `lost` set, when another
    process holds it now."""
    if self.lost is not None:
      return False
    if self._generation is None:  # a local lease: the kernel keeps it
      return True
    try:
      generation = files.replace_if_generation(self.path, self._record(), self._generation)
    except OSError as e:  # a transient failure: the next renewal tries again (the lease expires only after timeout)
      logging.warning('could not renew the lease of workdir %s: %s', self.workdir, e)
      return True
    if generation is None:
      self.lost = self._holder_now()
      logging.error('lost the lease of workdir %s to %s', self.workdir, _holder(self.lost))
      return False
    self._generation = generation
    return True

  def _holder_now(self) -> dict:
    """Who the bucket's lease object names now ({} when there is none)."""
    found = files.read_with_generation(self.path)
    return _parse(found[0]) if found else {}

  def check(self) -> None:
    """Raises ConfigError when another process has taken the lease over (this run must not write any more)."""
    if self.lost is not None:
      raise ConfigError(f'the lease of workdir {self.workdir} was taken over by another process '
                        f'({_holder(self.lost)}): this run stops without saving')

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None
      found = files.read_with_generation(self.path)
      if self.lost is None and found is not None and found[1] == self._generation:
        files.remove(self.path)  # ours still (a taker in between finds it gone, or expired, and creates its own)
      self._generation = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False


def _parse(data: bytes) -> dict:
  try:
    return json.loads(data.decode() or '{}')
  except ValueError:
    return {}


def _read_fd(fd: int) -> dict:
  return _parse(os.pread(fd, 4096, 0))
