"""`experiments/gpu_check.sh lm` (-> reproduce.py --table lm -> experiments/lm_table.py) in its tiny CPU mode on a
corpus written here: the learning rate chosen on validation per family, fine-tunes started from the FP run of the
same seed, paired differences by hand, TTQ's scale trajectories, and the JSON / markdown written."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, xla_flags


@pytest.mark.slow
def test_gpu_check_lm_in_tiny_mode(tmp_path, text_corpus):
  out_dir, wd = tmp_path / 'out', tmp_path / 'wd'
  env = dict(os.environ, OUT=str(out_dir), LM_BUDGET='tiny', GPU_CHECK_NO_WHEELS='1',
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'], LM_SEEDS='0,1', LM_ROWS='fp,ttq_ft', LM_WORKDIR=str(wd),
             TTQ_TEXT_DIR=text_corpus, XLA_FLAGS=xla_flags())
  p = subprocess.run(['bash', 'experiments/gpu_check.sh', 'lm'], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  out = json.loads((out_dir / 'lm_gpu.json').read_text())
  root = wd / 'lm' / 'tiny'
  assert out['complete'] and out['budget'] == 'tiny'
  for family in ('fp', 'ttq'):  # ttq: the family of the fine-tune
    scores = out['lr_choice'][family]['validation_bits_per_byte']
    assert sorted(scores) == ['0.003', '0.01'] and out['lr_choice'][family]['chosen'] == float(min(scores, key=scores.get))
  fp, ft = out['rows']['fp'], out['rows']['ttq_ft']
  assert fp['seeds'] == ft['seeds'] == [0, 1] and fp['minus_fp'] is None
  assert ft['learning_rate'] == out['lr_choice']['ttq']['chosen'] and fp['learning_rate'] == out['lr_choice']['fp']['chosen']
  results = {(k, s): json.loads((root / k / f'seed_{s}' / 'result.json').read_text()) for k in ('fp', 'ttq_ft') for s in (0, 1)}
  for s in (0, 1):
    init = json.loads((root / 'ttq_ft' / f'seed_{s}' / 'init_from.json').read_text())
    assert os.path.samefile(init['path'], root / 'fp' / f'seed_{s}') and init['step'] == 8
  diffs = [results['ttq_ft', s]['best_on_validation']['running']['bits_per_byte'] -
           results['fp', s]['best_on_validation']['running']['bits_per_byte'] for s in (0, 1)]
  assert ft['minus_fp']['mean'] == pytest.approx(np.mean(diffs))
  assert ft['minus_fp']['se'] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(2))
  layers = out['ttq_scale_trajectories']['ttq_ft']
  assert len(layers) == 7 and all(len(t['step']) == len(t['w_p']) == len(t['w_n']) >= 2 for t in layers.values())
  assert ft['samples_seed_0'] and out['dataset']['corpus_sha256'] and out['dataset']['package'] is None
  assert '| TTQ fine-tuned from FP | 2 |' in (out_dir / 'lm_gpu.md').read_text()
  assert 'wrote' in (out_dir / 'log.txt').read_text() and (out_dir / 'lm_gpu.png').stat().st_size > 0


def test_readme_table_is_the_generated_one():
  """The README shows exactly what `lm_table.markdown` makes of the committed CPU results."""
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import lm_table
  with open(lm_table.RESULTS) as f:
    data = json.load(f)
  assert data['complete'] and data['budget'] == 'cpu' and data['seeds'] == [0, 1, 2]
  for key in ('fp', 'ttq', 'bitnet'):
    assert data['rows'][key]['seeds'] == [0, 1, 2]
  readme = open(os.path.join(ROOT, 'README.md')).read()
  assert lm_table.readme_block(readme) == lm_table.markdown(data), (
      'README.md is stale: paste experiments/lm_table.py markdown() of experiments/results/lm.json between '
      f'{lm_table.README_START} and {lm_table.README_END}')
