"""Byte-level text corpora for language models: the reStructuredText sources of Debian's Python documentation
(`python_docs`: package python3-doc, ~11 MB in ~500 `_sources/**/*.rst.txt` files for Python 3.11), split by
document with a fixed hash, sampled as windows of `seq_len + 1` bytes.

- Split: sha256 of a document's path relative to the corpus root (not Python's salted `hash()`): the first 32
  bits as a fraction below `TEST_FRACTION` -> test, below `TEST_FRACTION + VALIDATION_FRACTION` -> validation,
  else train. A split is its documents' bytes in path order, each followed by one newline.
- Training batch k is a pure function of (seed, k): `batch` windows at starts drawn by
  `numpy.random.default_rng([seed, k])`, so a resumed or multi-process run sees the same data.
- Evaluation scores every byte of a split after its first exactly once: non-overlapping windows, window i
  predicting bytes i * seq_len + 1 ... (i + 1) * seq_len from the bytes before them in the window; the last
  window is padded and masked.
- Bits per byte = summed next-byte cross-entropy (nats) / scored bytes / ln 2 (lower is better).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import subprocess
import sys

import grain
import numpy as np

from ttq_jax import files
from ttq_jax.errors import ConfigError, DataError

DEBIAN_PYTHON_DOCS = ('/usr/share/doc/python3/html/_sources', '/usr/share/doc/python3.11/html/_sources')
SUFFIX = '.rst.txt'
TEST_FRACTION = 0.05
VALIDATION_FRACTION = 0.05
SPLITS = ('train', 'validation', 'test')


def corpus_dir(data_dir: str | None = None) -> str:
  """`data_dir` when set, else $TTQ_TEXT_DIR when set: the only place looked (a run that names its data must not
  quietly read other files); else the first of Debian's folders that holds `*.rst.txt` files."""
  for named, where in ((data_dir, 'data.data_dir'), (os.environ.get('TTQ_TEXT_DIR'), '$TTQ_TEXT_DIR')):
    if named:
      if not (os.path.isdir(named) and any(f.endswith(SUFFIX) for _, _, fs in os.walk(named) for f in fs)):
        raise DataError(f'the python_docs corpus is not in {where}={named!r} (no *{SUFFIX} files): name a folder of '
                        f'*{SUFFIX} files or unset {where} (Debian\'s copy: `apt-get install python3-doc`)')
      return named
  candidates = list(DEBIAN_PYTHON_DOCS)
  for d in candidates:
    if os.path.isdir(d) and any(f.endswith(SUFFIX) for _, _, fs in os.walk(d) for f in fs):
      return d
  raise DataError(f'the python_docs corpus is not in {", ".join(candidates)} (no *{SUFFIX} files): install it with '
                  '`apt-get install python3-doc` (Debian), or name a folder of *.rst.txt files with '
                  '--config.data.data_dir or $TTQ_TEXT_DIR')


def document_paths(root: str) -> list[str]:
  """The corpus's documents: paths relative to `root`, '/'-separated, sorted."""
  out = []
  for d, _, fs in os.walk(root):
    out += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, '/') for f in fs if f.endswith(SUFFIX)]
  return sorted(out)


def split_of(path: str) -> str:
  """'train' | 'validation' | 'test' of a document, from the sha256 of its relative path."""
  u = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 2 ** 32
  return 'test' if u < TEST_FRACTION else 'validation' if u < TEST_FRACTION + VALIDATION_FRACTION else 'train'


def load_split(root: str, split: str) -> np.ndarray:
  """The bytes of a split (uint8, 1-D): its documents in path order, each followed by a newline."""
  if split not in SPLITS:
    raise DataError(f'split={split!r} is unknown: allowed are {", ".join(SPLITS)}')
  parts = [files.read_bytes(os.path.join(root, p)) + b'\n' for p in document_paths(root) if split_of(p) == split]
  if not parts:
    raise DataError(f'the corpus in {root} has no {split} documents (split by the sha256 of each path)')
  return np.frombuffer(b''.join(parts), np.uint8)


def corpus_sha256(root: str) -> str:
  """sha256 over every document's relative path and bytes, in path order: which text a run saw."""
  h = hashlib.sha256()
  for p in document_paths(root):
    data = files.read_bytes(os.path.join(root, p))
    h.update(f'{p}\0{len(data)}\0'.encode())
    h.update(data)
  return h.hexdigest()


def package_version(package: str = 'python3-doc') -> str | None:
  """The installed Debian package's version (apt cannot pin it, so runs record it), or None."""
  try:
    p = subprocess.run(['dpkg-query', '-W', '-f=${Version}', package], capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return p.stdout.strip() or None if p.returncode == 0 else None


def train_batch(data: np.ndarray, *, seed: int, k: int, batch: int, seq_len: int) -> np.ndarray:
  """Batch k of training: int32 [batch, seq_len + 1] windows of `data` at starts drawn from (seed, k)."""
  if len(data) < seq_len + 2:
    raise DataError(f'data.seq_len={seq_len} needs at least {seq_len + 2} bytes of training text, there are {len(data)}')
  starts = np.random.default_rng([seed, k]).integers(0, len(data) - seq_len, size=batch)
  return np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def steps_per_epoch(num_bytes: int, batch: int, seq_len: int) -> int:
  """An epoch: the split's bytes once, in predicted bytes (batch * seq_len per step)."""
  return max(1, num_bytes // (batch * seq_len))


def eval_windows(data: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(windows int32 [n, seq_len + 1], mask float32 [n, seq_len]): window i is data[i * seq_len : (i + 1) *
  seq_len + 1], padded with 0; mask[i, j] = 1 where byte i * seq_len + j + 1 exists (scored once)."""
  n = max(1, math.ceil((len(data) - 1) / seq_len))
  padded = np.zeros(n * seq_len + 1, np.int32)
  padded[:len(data)] = data
  windows = np.stack([padded[i * seq_len:(i + 1) * seq_len + 1] for i in range(n)])
  targets = np.arange(n * seq_len).reshape(n, seq_len) + 1
  return windows, (targets < len(data)).astype(np.float32)


# --------------------------------------------------------------------------- the dataset `python_docs`


@functools.cache
def split_bytes(root: str, split: str) -> np.ndarray:
  """`load_split`, read once per process."""
  return load_split(root, split)


def _root(data_config) -> str:
  return corpus_dir(data_config.data_dir or None)


def _seq_len(data_config) -> int:
  seq_len = int(data_config.seq_len)
  if seq_len < 2:
    raise ConfigError(f'data.seq_len={seq_len} must be an integer >= 2 (bytes a window predicts)')
  return seq_len


def dataset_facts(entry, data_config):
  """`entry` (a `datasets.DatasetInfo`) with what the corpus and `data.seq_len` decide: the input shape
  (seq_len,), and the training / test sizes in windows of seq_len bytes (so an epoch is the training bytes
  once: train bytes // (batch * seq_len) steps)."""
  root, seq_len = _root(data_config), _seq_len(data_config)
  train, test = split_bytes(root, 'train'), split_bytes(root, 'test')
  if len(train) < seq_len + 2:
    raise DataError(f'data.seq_len={seq_len} needs at least {seq_len + 2} bytes of training text, the corpus in '
                    f'{root} has {len(train)}')
  return dataclasses.replace(entry, input_shape=(seq_len,), train_size=len(train) // seq_len,
                             test_size=max(1, (len(test) - 1) // seq_len))


def source(data_config, split: str) -> np.ndarray:
  """The bytes of `split` ('train' | 'validation' | 'test')."""
  return split_bytes(_root(data_config), split)


def record(data_config) -> dict:
  """Which text a run saw (apt cannot pin the package version): corpus digest, package version, split sizes."""
  root = _root(data_config)
  debian = os.path.realpath(root) in {os.path.realpath(d) for d in DEBIAN_PYTHON_DOCS}
  return {'corpus_sha256': corpus_sha256(root), 'package': 'python3-doc' if debian else None,
          'package_version': package_version() if debian else None,
          'corpus_dir': root, **{f'{s}_bytes': int(len(split_bytes(root, s))) for s in SPLITS}}


def train_dataset(data_config, *, local_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, source_bytes: np.ndarray | None = None) -> grain.MapDataset:
  """Infinite batches {'tokens': int32 [local_batch_size, seq_len + 1]}: this process's rows of global batch
  k = `train_batch(seed, k)`, so every process count sees the same global batches. `source_bytes`: the training
  split's bytes when the caller holds them (else read here)."""
  data = source(data_config, 'train') if source_bytes is None else source_bytes
  seq_len = _seq_len(data_config)
  global_batch, lo = local_batch_size * process_count, process_index * local_batch_size

  def batch(k: int) -> dict[str, np.ndarray]:
    tokens = train_batch(data, seed=seed, k=k, batch=global_batch, seq_len=seq_len)
    return {'tokens': tokens[lo:lo + local_batch_size]}
  return grain.MapDataset.range(sys.maxsize).map(batch)


def eval_dataset(data_config, *, split: str, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                 source_bytes: np.ndarray | None = None) -> grain.MapDataset:
  """Batch k = this process's part of global batch k of `eval_windows` in order: {'tokens', 'mask'}, the
  windows past the end padded with mask 0, so every byte of the split after the first counts once."""
  data = source(data_config, split) if source_bytes is None else source_bytes
  windows, mask = eval_windows(data, _seq_len(data_config))
  local = global_batch_size // process_count

  def batch(k: int) -> dict[str, np.ndarray]:
    idx = np.arange(k * global_batch_size + process_index * local, k * global_batch_size + (process_index + 1) * local)
    valid = idx < len(windows)
    idx = np.where(valid, idx, 0)
    return {'tokens': windows[idx], 'mask': mask[idx] * valid[:, None].astype(np.float32)}
  return grain.MapDataset.range(-(-len(windows) // global_batch_size)).map(batch)
