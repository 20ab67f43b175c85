"""The tables' statistics by hand: paired t (df = n - 1) against the closed form for df = 2, Holm's step-down."""

import math

import pytest

from ttq_jax import statistics


def test_paired_t_test_by_hand():
  """Differences 1, 2, 3: mean 2, sd 1, se 1/sqrt 3, t = 2 sqrt 3; for df = 2 the two-sided p is 1 - t / sqrt(2 + t^2)."""
  a, b = {0: 3.0, 1: 5.0, 2: 7.0, 9: 1.0}, {0: 2.0, 1: 3.0, 2: 4.0}  # seed 9 has no partner: left out
  d = statistics.paired(a, b, 'x', 'y')
  t = 2 * math.sqrt(3)
  assert (d['a'], d['b'], d['n'], d['mean']) == ('x', 'y', 3, 2.0)
  assert d['se'] == pytest.approx(1 / math.sqrt(3)) and d['t'] == pytest.approx(t)
  assert d['p'] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)  # 0.0742
  assert d['per_seed'] == {'0': 1.0, '1': 2.0, '2': 3.0}
  assert statistics.verdict({**d, 'p_holm': d['p']}) == 'not resolved'  # p ~ 0.07 at 3 seeds, "2 SE" apart


def test_one_seed_has_no_test_and_no_shared_seed_no_comparison():
  d = statistics.paired({0: 1.0}, {0: 0.5})
  assert d['mean'] == 0.5 and d['se'] is None and d['t'] is None and d['p'] is None
  assert statistics.verdict(d) == 'no test (1 seed)'
  assert statistics.paired({0: 1.0}, {1: 1.0}) is None


def test_holm_by_hand():
  """p = .01, .04, .03: ranks 1..3 multiply by 3, 2, 1 -> .03, .06, .04 -> monotone .03, .06, .06."""
  assert statistics.holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
  assert statistics.holm([0.6, 0.5]) == [1.0, 1.0]  # capped at 1
  tests = statistics.holm_adjusted([{'p': 0.01, 'n': 3}, None, {'p': 0.04, 'n': 3}])
  assert [t['p_holm'] for t in tests] == pytest.approx([0.02, 0.04])
  assert [statistics.verdict(t) for t in tests] == ['resolved', 'resolved']


def test_mean_se():
  m = statistics.mean_se([1.0, 2.0, 3.0])
  assert m == {'mean': 2.0, 'std': 1.0, 'se': pytest.approx(1 / math.sqrt(3)), 'n': 3}
  assert statistics.mean_se([4.0])['se'] is None


@pytest.mark.parametrize('x, kwargs, expected', [
    ([0.5, 0.7, 0.9], {}, '0.70 ± 0.20'),                      # values: mean ± sample std (ddof 1)
    ([0.5, None, 0.9], {'scale': 100, 'digits': 1}, '70.0 ± 28.3'),  # None dropped; fractions as percent
    ([0.25], {}, '0.25'),                                       # one value: no spread
    ([], {}, '-'),
    ({'mean': -0.1234, 'std': 0.5, 'se': 0.05}, {'digits': 3, 'signed': True}, '-0.123 ± 0.050'),  # se before std
    ({'mean': 0.1234, 'std': 0.02, 'n': 3}, {'digits': 3, 'signed': True}, '+0.123 ± 0.020'),
    ({'mean': 1.0, 'se': None}, {}, '1.00'),
])
def test_mean_spread(x, kwargs, expected):
  assert statistics.mean_spread(x, **kwargs) == expected


def test_provenance_of_this_checkout(tmp_path):
  """The commit of a git checkout and whether code differs from it (results files may change)."""
  import subprocess
  from ttq_jax import provenance
  run = lambda *a: subprocess.run(['git', '-C', str(tmp_path), *a], check=True, capture_output=True)
  run('init', '-q')
  (tmp_path / 'code.py').write_text('x = 1\n')
  (tmp_path / 'experiments' / 'results').mkdir(parents=True)
  (tmp_path / 'experiments' / 'results' / 't.json').write_text('{}\n')
  run('add', '.')
  run('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'c')
  state = provenance.git_state(str(tmp_path))
  assert len(state['commit']) == 40 and state['clean'] is True
  (tmp_path / 'experiments' / 'results' / 't.json').write_text('{"rows": 1}\n')
  assert provenance.git_state(str(tmp_path))['clean'] is True  # a table being rewritten
  (tmp_path / 'code.py').write_text('x = 2\n')
  assert provenance.git_state(str(tmp_path))['clean'] is False
  assert provenance.git_state(str(tmp_path / 'experiments'))['commit'] == state['commit']
  plain = tmp_path.parent / f'{tmp_path.name}_plain'  # (pytest's temporary folders are outside any checkout)
  plain.mkdir()
  assert provenance.git_state(str(plain)) == {'commit': None, 'clean': None}
