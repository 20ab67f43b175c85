"""Fashion-MNIST's gzip IDX files: where they are (`data.data_dir`, `$TTQ_DATA_DIR`, Debian's folder) and reading
them (local arrays cached while the file is unchanged; buckets read once per call)."""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib

import numpy as np

from ttq_jax import files
from ttq_jax.errors import DataError

FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'

def fashion_mnist_dir(data_dir: str | None) -> str:
  """config.data.data_dir (a folder or a bucket URL) when it is set, else $TTQ_DATA_DIR when that is set: the
  only place looked (a run that names its data must not quietly read other files); else Debian's folder."""
  names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
  for named, where in ((data_dir, 'data.data_dir'), (os.environ.get('TTQ_DATA_DIR'), '$TTQ_DATA_DIR')):
    if not named:
      continue
    missing = [n for n in names if not files.isfile(files.join(named, n))]
    if missing:
      raise DataError(f'Fashion-MNIST not found in {where}={named!r}: missing {", ".join(missing)} '
                      f'(looked for {", ".join(names)}); put the four gzip IDX files there or unset {where}')
    return named
  candidates = [DEBIAN_FASHION_MNIST]
  for d in candidates:
    if all(files.isfile(files.join(d, n)) for n in names):
      return d
  raise DataError(
      f'Fashion-MNIST not found: looked for {", ".join(names)} in {", ".join(candidates)}; '
      'install them with `apt-get install dataset-fashion-mnist` (Debian) or put the four gzip files '
      'from github.com/zalandoresearch/fashion-mnist in a folder named by --config.data.data_dir or $TTQ_DATA_DIR')


def _read_idx(path: str, expected_ndim: int) -> np.ndarray:
  """The array of a gzip IDX file, read-only. A local file's decoded array is kept for as long as the file's
  size and modification time stay the same (`_read_local_idx`): a run reads each split several times (train,
  validation, BN re-estimation, test), and a notebook runs many; decompressing the training images takes
  ~0.3 s each time."""
  if files.is_url(path):
    return _decode_idx(path, expected_ndim)
  try:
    stat = os.stat(path)
  except OSError:
    return _decode_idx(path, expected_ndim)  # raises the one-line error
  return _read_local_idx(path, expected_ndim, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)  # the four Fashion-MNIST files, twice over
def _read_local_idx(path: str, expected_ndim: int, size: int, mtime_ns: int) -> np.ndarray:
  del size, mtime_ns  # the cache key: a rewritten file is read again
  return _decode_idx(path, expected_ndim)


def _decode_idx(path: str, expected_ndim: int) -> np.ndarray:
  try:
    data = gzip.decompress(files.read_bytes(path))
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'malformed IDX file {path}: {e}') from None
  zero, dtype_code, ndim = struct.unpack('>HBB', data[:4]) if len(data) >= 4 else (-1, 0, 0)
  if zero != 0 or dtype_code != 0x08 or ndim != expected_ndim:
    raise DataError(f'malformed IDX file {path} ({len(data)} bytes): header says dtype 0x{dtype_code:02x}, {ndim} '
                    f'dims (want uint8 with {expected_ndim} dims)')
  if len(data) < 4 + 4 * ndim:
    raise DataError(f'malformed IDX file {path}: truncated header ({len(data)} bytes)')
  shape = struct.unpack('>' + 'I' * ndim, data[4:4 + 4 * ndim])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise DataError(f'malformed IDX file {path}: {body.size} values for shape {shape}')
  return body.reshape(shape)


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28, 1], labels int32 [N]) of 'train' or 'test'."""
  d = fashion_mnist_dir(data_dir)
  images_file, labels_file = FASHION_MNIST_FILES[split]
  images = _read_idx(files.join(d, images_file), 3)[..., None]
  labels = _read_idx(files.join(d, labels_file), 1).astype(np.int32)
  if len(images) != len(labels):
    raise DataError(f'malformed Fashion-MNIST in {d}: {len(images)} images but {len(labels)} labels')
  return images, labels
