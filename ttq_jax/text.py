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

import hashlib
import math
import os
import subprocess

import numpy as np

from ttq_jax import files
from ttq_jax.errors import DataError

DEBIAN_PYTHON_DOCS = ('/usr/share/doc/python3/html/_sources', '/usr/share/doc/python3.11/html/_sources')
SUFFIX = '.rst.txt'
TEST_FRACTION = 0.05
VALIDATION_FRACTION = 0.05
SPLITS = ('train', 'validation', 'test')


def corpus_dir(data_dir: str | None = None) -> str:
  """`data_dir` when set (the only place looked); else the first of $TTQ_TEXT_DIR and Debian's folders that
  holds `*.rst.txt` files."""
  candidates = [data_dir] if data_dir else [d for d in (os.environ.get('TTQ_TEXT_DIR'), *DEBIAN_PYTHON_DOCS) if d]
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


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
  """Summed next-byte cross-entropy (nats) over `num_bytes` predicted bytes, in bits per byte."""
  return float(nll_nats) / max(1, int(num_bytes)) / math.log(2)
