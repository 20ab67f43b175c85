"""Atomic writes: readers see the old file or the new one, never a partial one; failures leave nothing."""

import os

import pytest

from ttq_jax import files


def test_write_replaces_atomically(tmp_path):
  path = str(tmp_path / 'sub' / 'a.json')
  files.write_json(path, {'b': 1, 'a': [1, 2]})
  assert open(path).read() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}'
  files.write_text(path, 'new')
  assert open(path).read() == 'new' and os.listdir(tmp_path / 'sub') == ['a.json']


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
  path = str(tmp_path / 'a.txt')
  files.write_text(path, 'old')
  with pytest.raises(RuntimeError):
    with files.atomic_path(path) as tmp:
      with open(tmp, 'w') as f:
        f.write('half')
      raise RuntimeError('crash while writing')
  assert open(path).read() == 'old' and os.listdir(tmp_path) == ['a.txt']
