"""experiments/benchmark.py: the memory analysis compiles the train step as training does."""

import os
import sys

from tests.conftest import ROOT


def test_memory_analysis_of_the_train_step(monkeypatch):
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import benchmark
  monkeypatch.setattr(benchmark, 'MEMORY_SETTINGS', [('resnet20', 'cifar10', 8)])
  results = {}
  benchmark.bench_memory(None, None, results)
  assert set(results['memory']) == {'resnet20/float32', 'resnet20/bfloat16'}
  for row in results['memory'].values():
    assert row['argument_bytes'] > 0 and row['total_bytes'] == (row['argument_bytes'] + row['output_bytes']
                                                                + row['temp_bytes'] - row['alias_bytes'])
  # bfloat16 compute keeps float32 parameters: the same arguments
  assert results['memory']['resnet20/float32']['argument_bytes'] == results['memory']['resnet20/bfloat16']['argument_bytes']
