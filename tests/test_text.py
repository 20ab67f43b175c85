"""The byte-level text corpus of ttq_jax/text.py on a tiny folder written here (never the apt package)."""

import hashlib

import numpy as np
import pytest

from ttq_jax import text
from ttq_jax.errors import DataError


@pytest.fixture
def corpus(tmp_path):
  """60 small documents in two folders, and a file that is not part of the corpus."""
  for i in range(60):
    d = tmp_path / ('library' if i % 2 else 'howto')
    d.mkdir(exist_ok=True)
    (d / f'doc{i}.rst.txt').write_bytes(f'Document {i}\n{"=" * (i % 7 + 1)}\nbody {i * i}\n'.encode())
  (tmp_path / 'objects.inv').write_bytes(b'not text')
  return str(tmp_path)


def test_split_is_the_sha256_of_the_relative_path(corpus):
  paths = text.document_paths(corpus)
  assert len(paths) == 60 and paths == sorted(paths) and all(p.endswith('.rst.txt') for p in paths)
  for p in paths:  # by hand: the first 32 bits of sha256 as a fraction of 2^32
    u = int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) / 2 ** 32
    assert text.split_of(p) == ('test' if u < 0.05 else 'validation' if u < 0.10 else 'train')
  splits = {s: [p for p in paths if text.split_of(p) == s] for s in text.SPLITS}
  assert splits['train'] and sum(map(len, splits.values())) == 60
  train = text.load_split(corpus, 'train')
  expected = b''.join(open(f'{corpus}/{p}', 'rb').read() + b'\n' for p in splits['train'])
  assert train.dtype == np.uint8 and train.tobytes() == expected


def test_training_batches_are_a_pure_function_of_seed_and_step():
  data = np.frombuffer(bytes(range(256)) * 4, np.uint8)
  a = text.train_batch(data, seed=3, k=7, batch=4, seq_len=16)
  np.testing.assert_array_equal(a, text.train_batch(data, seed=3, k=7, batch=4, seq_len=16))
  assert not np.array_equal(a, text.train_batch(data, seed=3, k=8, batch=4, seq_len=16))
  assert a.shape == (4, 17) and a.dtype == np.int32
  for row in a:  # contiguous windows: consecutive bytes of range(256) * 4 differ by 1 (mod 256)
    assert np.all(np.diff(row.astype(np.int64)) % 256 == 1)
  assert text.steps_per_epoch(1000, 4, 16) == 15
  with pytest.raises(DataError, match='data.seq_len=16 needs at least 18 bytes'):
    text.train_batch(data[:10], seed=0, k=0, batch=1, seq_len=16)


@pytest.mark.parametrize('n,seq_len', [(11, 5), (12, 5), (7, 16)])
def test_evaluation_scores_every_byte_after_the_first_once(n, seq_len):
  data = np.arange(1, n + 1, dtype=np.uint8)
  windows, mask = text.eval_windows(data, seq_len)
  assert mask.sum() == n - 1
  targets = windows[:, 1:][mask > 0]
  np.testing.assert_array_equal(targets, data[1:])  # each predicted byte once, in order
  for w, m in zip(windows, mask):  # the context of each target is the bytes just before it
    for j in np.flatnonzero(m):
      assert w[j] + 1 == w[j + 1]


def test_corpus_digest_and_a_missing_corpus(corpus, tmp_path_factory):
  digest = text.corpus_sha256(corpus)
  assert digest == text.corpus_sha256(corpus) and len(digest) == 64
  with open(f'{corpus}/{text.document_paths(corpus)[0]}', 'ab') as f:
    f.write(b'!')
  assert text.corpus_sha256(corpus) != digest
  empty = str(tmp_path_factory.mktemp('empty'))
  with pytest.raises(DataError, match=r'apt-get install python3-doc') as e:
    text.corpus_dir(empty)
  assert '\n' not in str(e.value) and empty in str(e.value)
  assert text.corpus_dir(corpus) == corpus
  with pytest.raises(DataError, match="split='dev' is unknown"):
    text.load_split(corpus, 'dev')


# --------------------------------------------------------------------------- the dataset python_docs


def _data_config(corpus, seq_len=16):
  import ml_collections
  return ml_collections.ConfigDict({'name': 'python_docs', 'data_dir': corpus, 'seq_len': seq_len})


def test_dataset_facts_are_measured_on_the_corpus(text_corpus):
  from ttq_jax import datasets
  info = datasets.dataset_info(_data_config(text_corpus, 16))
  train, test = text.load_split(text_corpus, 'train'), text.load_split(text_corpus, 'test')
  assert info.input_shape == (16,) and info.input_dtype == 'int32' and info.task == 'next_byte'
  assert info.train_size == len(train) // 16 and info.test_size == (len(test) - 1) // 16
  record = text.record(_data_config(text_corpus))
  assert record['corpus_sha256'] == text.corpus_sha256(text_corpus) and record['train_bytes'] == len(train)
  assert record['package'] is None and record['package_version'] is None  # not Debian's folder: no package claimed
  with pytest.raises(text.ConfigError, match=r'data.seq_len=1 must be an integer >= 2'):
    datasets.dataset_info(_data_config(text_corpus, 1))


def test_processes_read_their_rows_of_the_same_global_batches(text_corpus):
  config = _data_config(text_corpus, 8)
  one = text.train_dataset(config, local_batch_size=6, seed=3)
  halves = [text.train_dataset(config, local_batch_size=3, seed=3, process_index=p, process_count=2) for p in (0, 1)]
  for k in (0, 5):
    np.testing.assert_array_equal(np.concatenate([h[k]['tokens'] for h in halves]), one[k]['tokens'])
  np.testing.assert_array_equal(one[5]['tokens'], text.train_batch(text.load_split(text_corpus, 'train'), seed=3, k=5,
                                                                    batch=6, seq_len=8))
  data = text.load_split(text_corpus, 'validation')
  whole = list(text.eval_dataset(config, split='validation', global_batch_size=8))
  parts = [list(text.eval_dataset(config, split='validation', global_batch_size=8, process_index=p, process_count=2))
           for p in (0, 1)]
  for k, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([p[k]['tokens'] for p in parts]), batch['tokens'])
    np.testing.assert_array_equal(np.concatenate([p[k]['mask'] for p in parts]), batch['mask'])
  mask = np.concatenate([b['mask'] for b in whole])
  targets = np.concatenate([b['tokens'][:, 1:] for b in whole])[mask > 0]
  np.testing.assert_array_equal(targets, data[1:])  # every byte after the first, once, in order (padding masked)
