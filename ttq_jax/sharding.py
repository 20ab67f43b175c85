"""Device mesh and shardings (pjit style: `jax.jit` with `NamedSharding`, no pmap), and the device prefetch of
global batches (`Prefetcher`).

The batch is split over every mesh axis (('data', 'fsdp') by default: pure data parallelism while
fsdp = 1). Parameters are replicated, except that with an 'fsdp' axis larger than 1 each large
parameter is split along its largest dimension divisible by it.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ttq_jax.errors import ConfigError

FSDP_MIN_SIZE = 2**18  # parameters smaller than this stay replicated


def create_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
  """A mesh over all (or the given) devices; one -1 in `shape` takes the remaining devices.

  A shape without -1 that needs fewer devices than there are uses the first ones (single process).
  """
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if len(shape) != len(axes):
    raise ConfigError(f'mesh_shape={tuple(shape)} and mesh_axes={tuple(axes)} differ in length')
  known = int(np.prod([s for s in shape if s != -1]))
  if shape.count(-1) > 1 or known <= 0 or len(devices) % known:
    raise ConfigError(f'mesh_shape={tuple(shape)} does not fit {len(devices)} devices: '
                      'use positive sizes whose product divides the device count, with at most one -1')
  if -1 not in shape and known < len(devices) and jax.process_count() == 1:
    devices = devices[:known]  # a smaller explicit mesh: the first devices of this host
  shape = [len(devices) // known if s == -1 else s for s in shape]
  if int(np.prod(shape)) != len(devices):
    raise ConfigError(f'mesh_shape={tuple(shape)} uses {int(np.prod(shape))} of {len(devices)} devices')
  return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], mesh: Mesh, fsdp_axis: str = 'fsdp') -> P:
  """FSDP rule: split the largest dimension divisible by the fsdp axis size; else replicate."""
  size = mesh.shape.get(fsdp_axis, 1)
  if size <= 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0:
      spec = [None] * len(shape)
      spec[dim] = fsdp_axis
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for every leaf of a (shape-only) train state."""
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, mesh)), abstract_state)


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'batch_size') -> None:
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n or batch_size % jax.process_count():
    raise ConfigError(f'{name}={batch_size} is not divisible by the {n} devices '
                      f'({jax.process_count()} processes): use a positive multiple of {n}')


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into one global array sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


class Prefetcher:
  """Pulls host batches from a `BatchIterator` and puts `depth` of them on the devices ahead of use;
  remembers the iterator state that follows each batch (saved with checkpoints)."""

  def __init__(self, iterator, mesh, depth: int):
    self.iterator, self.mesh, self.depth = iterator, mesh, max(1, depth)
    self.queue: list = []

  def _fill(self):
    while len(self.queue) < self.depth:
      local = next(self.iterator)
      self.queue.append((global_batch(local, self.mesh), self.iterator.get_state()))

  def next(self):
    """(the next global batch on the devices, the iterator state after it)."""
    self._fill()
    batch, state = self.queue.pop(0)
    self._fill()
    return batch, state
