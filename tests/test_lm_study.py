"""`reproduce.py --table lm_study` (experiments/lm_study.py) at its tiny budget, in this process, on a corpus written
here: one FP run, a two-point learning-rate choice for TTQ, every row fine-tuned from the FP run (same parameters,
recorded by digest), the paired tests recomputed from the per-seed values, the dynamics curves, JSON / markdown /
plot; and the README's study section is the one generated from the committed results."""

import json
import os
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import lm_study  # noqa: E402
from ttq_jax import statistics  # noqa: E402


def check_paired_recompute(out: dict) -> None:
  """Every paired entry of a study JSON equals the test recomputed from the rows' per-seed values."""
  by_seed = {k: {p['seed']: p['test_bits_per_byte'] for p in r['per_seed']} for k, r in out['rows'].items()}
  expected = statistics.holm_adjusted([statistics.paired(by_seed[p['a']], by_seed[p['b']], p['a'], p['b'])
                                       for p in out['paired']])
  assert len(expected) == len(out['paired'])
  for got, want in zip(out['paired'], expected):
    for key in ('a', 'b', 'n', 'mean', 'se', 't', 'p', 'p_holm'):
      assert got[key] == (pytest.approx(want[key]) if isinstance(want[key], float) else want[key]), key


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, text_corpus):
  out = lm_study.run_study(budget='tiny', seeds=[0], workdir_root=str(tmp_path), data_dir=text_corpus,
                           log=lambda *a: None)
  root = tmp_path / 'lm_study' / 'tiny'
  assert out['complete'] and out['budget'] == 'tiny' and out['seeds'] == [0]
  assert out['steps'] == {'fp': 6, 'finetune': 4, 'lr_choice': 2}
  assert len(out['commit']) == 40 and isinstance(out['clean'], bool) and out['command']
  assert set(out['rows']) == {'fp', 'ttq', 'paretoq', 'bitnet', 'twn', 'ttq_channel'}
  scores = out['lr_choice']['ttq']['validation_bits_per_byte']
  assert sorted(scores) == ['0.003', '0.01'] and out['lr_choice']['ttq']['chosen'] == float(min(scores, key=scores.get))
  assert out['rows']['ttq_channel']['learning_rate'] == out['rows']['ttq']['learning_rate'] == out['lr_choice']['ttq']['chosen']
  digests = set()
  for key, row in out['rows'].items():
    (run,) = row['per_seed']
    result = json.loads((root / key / 'seed_0' / 'result.json').read_text())
    assert run['test_bits_per_byte'] == result['best_on_validation']['running']['bits_per_byte']
    assert run['seed'] == 0 and run['wall_s'] == result['elapsed_s'] and run['learning_rate'] > 0
    assert run['init_params_sha256'] == result['init_from']['params_sha256']
    assert os.path.samefile(result['init_from']['path'], root / 'fp_base' / 'seed_0') and result['init_from']['step'] == 6
    assert out['configs'][f'{key}/seed_0']['init_from'] == str(root / 'fp_base' / 'seed_0')
    digests.add(run['init_params_sha256'])
  assert len(digests) == 1 and out['init_shared'] == {'0': True}
  assert out['configs']['paretoq/seed_0']['quant']['scale_granularity'] == 'channel'
  assert out['configs']['ttq_channel/seed_0']['quant']['scale_granularity'] == 'channel'
  assert out['configs']['ttq/seed_0']['quant']['scale_granularity'] == 'tensor'
  assert [(p['a'], p['b']) for p in out['paired']][-4:] == [('ttq', 'paretoq'), ('ttq', 'bitnet'), ('paretoq', 'bitnet'),
                                                            ('ttq', 'ttq_channel')]
  assert all(p['p'] is None and p['n'] == 1 for p in out['paired'])  # one seed: no test
  check_paired_recompute(out)
  dynamics = out['dynamics_seed_0']['paretoq']
  assert dynamics['flip_rate'][0] is None and all(0 <= f <= 1 for f in dynamics['flip_rate'][1:])
  assert len(dynamics['step']) >= 2 and all(0 <= v <= 1 for v in dynamics['near_threshold'])
  assert out['wall_minutes'] == pytest.approx(sum(r['wall_s'] for r in [*out['fp_base'], *out['lr_choice_runs'],
                                                                          *[p for r in out['rows'].values() for p in r['per_seed']]]) / 60)
  assert '| ParetoQ | channel | 1 |' in (root / 'lm_study.md').read_text()
  assert (root / 'lm_study.png').stat().st_size > 0


def test_readme_study_section_is_the_generated_one():
  """README shows exactly `lm_study.markdown` of the committed results, whose paired tests recompute."""
  with open(lm_study.RESULTS) as f:
    data = json.load(f)
  assert data['budget'] == 'cpu' and data['steps'] == {'fp': 1000, 'finetune': 500, 'lr_choice': 200}
  check_paired_recompute(data)
  readme = open(os.path.join(ROOT, 'README.md')).read()
  assert lm_study.readme_block(readme) == lm_study.markdown(data), (
      'README.md is stale: paste experiments/lm_study.py markdown() of experiments/results/lm_study.json between '
      f'{lm_study.README_START} and {lm_study.README_END}')
