"""Input pipelines over the sources of `ttq_jax.datasets`: grain datasets of batches and worker processes (the
device prefetch that follows them: `sharding.Prefetcher`; this module does not import JAX, for the workers).

All datasets go through `grain.MapDataset` (random access, so the iterator state is one index and a
resumed run sees exactly the batches it would have seen). Each process reads only its shard
(`jax.process_index()`); images leave the host as uint8 and are normalised on the device
(`datasets.normalize`), which keeps host->device traffic 4x smaller. Batches are made by worker processes
(`data.worker_processes`, `BatchIterator`) or, with none, by threads of the training process. What a batch
holds and how it is cropped, decoded or windowed is the dataset's reader's (`ttq_jax.readers`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Iterator

import grain
import numpy as np

from ttq_jax import datasets
from ttq_jax import readers
from ttq_jax.errors import ConfigError

# Random streams derived from config.seed: the shuffle uses the seed itself, augmentation seed + 1
# (`readers.AUGMENT_SEED_OFFSET`), and the un-augmented stream for BN re-estimation shuffles with seed + 7
# (other batches than training).
CLEAN_STREAM_SEED_OFFSET = 7
# data.worker_processes = -1 (auto): the host's cores less what the training process keeps busy itself
# (the Python loop dispatching steps, device transfers, grain's reader threads).
AUTO_WORKERS = -1
TRAINING_PROCESS_CORES = 2


def train_dataset(data_config, *, local_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, augment: bool = True, user_sources: dict | None = None) -> grain.MapDataset:
  """Infinite, shuffled-per-epoch, augmented batches: this process's rows of each global batch (the dataset's
  reader makes them, `ttq_jax.readers`).

  Batch k is a pure function of (seed, k) and the process's row range: `ds[k]` can be recomputed at
  any time, and a run on N processes sees the same global batches and augmentations as on one.
  `user_sources`: your own data's (`datasets.UserData.sources`).
  """
  info = datasets.dataset_info(data_config)
  return readers.reader(info).train_dataset(
      datasets.get_source(data_config, 'train', user_sources), info, data_config, local_batch_size=local_batch_size,
      seed=seed, process_index=process_index, process_count=process_count, augment=augment)


def eval_dataset(data_config, *, split: str = 'test', global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, source=None) -> grain.MapDataset:
  """Batch k = this process's part of global eval batch k, in order, the last one padded (`mask` = 0);
  `source`: the split's source when the caller already holds it (else it is opened here)."""
  info = datasets.dataset_info(data_config)
  source = datasets.get_source(data_config, split) if source is None else source
  return readers.reader(info).eval_dataset(source, info, data_config, split=split, global_batch_size=global_batch_size,
                                           process_index=process_index, process_count=process_count)


def eval_batches(data_config, *, split: str = 'test', global_batch_size: int, process_index: int = 0,
                 process_count: int = 1, source=None, workers: int = 0,
                 threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """The batches of `eval_dataset`, made by `workers` processes (0: `threads` threads of this one)."""
  ds = eval_dataset(data_config, split=split, global_batch_size=global_batch_size, process_index=process_index,
                    process_count=process_count, source=source)
  with BatchIterator(ds, workers=workers, threads=threads) as it:
    yield from it


def clean_train_dataset(data_config, *, local_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, user_sources: dict | None = None) -> grain.MapDataset:
  """Un-augmented training batches from their own shuffle (for BN re-estimation)."""
  return train_dataset(data_config, local_batch_size=local_batch_size, seed=seed + CLEAN_STREAM_SEED_OFFSET,
                       process_index=process_index, process_count=process_count, augment=False,
                       user_sources=user_sources)


def worker_count(data_config) -> int:
  """Worker processes of the input pipeline: data.worker_processes, or with -1 the host's cores (those this
  process may use) less TRAINING_PROCESS_CORES."""
  n = int(data_config.worker_processes)
  if n == AUTO_WORKERS:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(0, cores - TRAINING_PROCESS_CORES)
  if n < 0:
    raise ConfigError(f'data.worker_processes={n}: allowed are 0 (threads of the training process), a number of '
                      f'processes, or {AUTO_WORKERS} (the host\'s cores less {TRAINING_PROCESS_CORES})')
  return n


def _worker_init(index: int, count: int) -> None:
  """In each worker process: the training process owns shutdown (SIGTERM / SIGINT reach the whole process
  group; it saves at the agreed step, then closes the workers), and a worker whose parent died (SIGKILL)
  exits instead of waiting on a full queue forever."""
  del index, count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  parent = os.getppid()

  def exit_with_parent():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)
  threading.Thread(target=exit_with_parent, daemon=True).start()


class BatchIterator:
  """Batches ds[start], ds[start + 1], ... of a `grain.MapDataset` of batches, made by `workers` processes
  (grain's `mp_prefetch`: worker w computes batches start + w, start + w + workers, ...; results are
  interleaved back in order) or, with 0 workers, by `threads` threads of this process.

  The state is the index of the next batch alone, so a run resumed with another worker count (or on
  another host) sees the same batches. Workers start on the first batch, no more than there are batches
  left (a short evaluation starts few); `close` (or leaving the `with` block) stops them.
  """

  def __init__(self, ds: grain.MapDataset, *, workers: int = 0, threads: int = 4, start: int = 0,
               buffer_per_worker: int = 2):
    self.ds, self.workers, self.threads, self.buffer = ds, workers, max(1, threads), buffer_per_worker
    self.next_index, self._it = start, None

  def _open(self):
    remaining = self.ds[self.next_index:]
    workers = min(self.workers, len(remaining))
    # a worker is one core's worth: it makes one batch at a time, `buffer_per_worker` ahead
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1) if workers else \
        grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=8)
    ds = remaining.to_iter_dataset(options)
    if workers:
      # Batches come back pickled through the workers' pipes, not in shared memory: grain 0.2's shared-memory
      # batches outlive a closed iterator (the resource tracker reports them leaked at exit).
      ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=1 << 62))
      from absl import flags  # grain's workers read its absl flags: from a notebook / pytest, take their defaults
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=self.buffer),
                          worker_init_fn=_worker_init)
    return iter(ds)

  def __iter__(self):
    return self

  def __next__(self):
    if self._it is None:
      self._it = self._open()
    batch = next(self._it)
    self.next_index += 1
    return batch

  def get_state(self) -> dict:
    return {'next_index': self.next_index}

  def set_state(self, state: dict) -> None:
    self.close()
    self.next_index = int(state['next_index'])

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
