"""experiments/benchmark_input.py runs on a tiny generated set and writes the JSON the README's table and
other tools read (numbers are not asserted: tests never time things)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_benchmark_input_writes_the_pinned_json(tmp_path):
  out = tmp_path / 'input.json'
  r = subprocess.run([sys.executable, 'experiments/benchmark_input.py', '--data-dir', str(tmp_path / 'data'),
                      '--train-examples', '64', '--eval-examples', '32', '--batch-size', '8', '--batches', '2',
                      '--warmup', '2', '--repeats', '1', '--workers', '1,2', '--per-core-images', '8', '--rounds', '1',
                      '--json', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  results = json.loads(out.read_text())
  for key in ('train_img_s', 'eval_img_s'):
    assert set(results[key]) == {'0', '1', '2'} and all(v > 0 for v in results[key].values())
  assert set(results['per_core_img_s']) == {'train', 'eval'} and min(results['per_core_img_s'].values()) > 0
  assert results['per_core_speedup']['train_vs_pil_bilinear'] > 0
  assert results['scaling_vs_1_worker']['train']['1'] == 1.0
  assert results['dataset']['train_examples'] == 64 and 'worker processes' in r.stdout
