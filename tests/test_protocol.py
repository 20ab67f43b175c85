"""The paper's protocol on Fashion-MNIST (`reproduce.py --table fashion_mnist_protocol`, experiments/protocol.py):
the entry point the GPU part calls runs end to end at the tiny budget; the results JSON keeps its pinned
fields; paired differences by hand; the README's table is the one generated from the committed JSON."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))

import protocol  # noqa: E402

ROW_FIELDS = {'name', 'method', 'threshold', 't', 'k', 'seeds', 'init_from', 'test_top1_running',
              'test_top1_reestimated', 'val_top1_best', 'mean_sparsity', 'scale_range'}
TOP_FIELDS = {'budget', 'machine', 'commit', 'rows', 'fp_init_test_top1', 'paired'}


def _check_schema(data, seeds):
  assert TOP_FIELDS <= set(data) and set(data['budget']) >= {'name', 'fp_steps', 'finetune_steps', 'batch_size'}
  assert [r['name'] for r in data['rows']] == ['fp', 'ttq_max', 'ttq_mean', 'twn_max', 'twn_mean']
  for r in data['rows']:
    assert ROW_FIELDS <= set(r) and r['seeds'] == seeds
    assert (r['method'], r['threshold']) == {'fp': ('fp', None), 'ttq_max': ('ttq', 'max'), 'ttq_mean': ('ttq', 'mean'),
                                             'twn_max': ('twn', 'max'), 'twn_mean': ('twn', 'mean')}[r['name']]
    assert r['t'] == (0.05 if r['threshold'] == 'max' else None) and r['k'] == (0.7 if r['threshold'] == 'mean' else None)
    for key in ('test_top1_running', 'test_top1_reestimated', 'val_top1_best', 'init_from', 'scale_range'):
      assert len(r[key]) == len(seeds)
    assert all(0 <= x <= 100 for x in r['test_top1_reestimated'])
  assert len(data['fp_init_test_top1']) == len(seeds)
  assert {(p['a'], p['b']) for p in data['paired']} >= {('ttq_max', 'fp'), ('ttq_max', 'twn_max'), ('ttq_max', 'ttq_mean')}


@pytest.mark.slow
def test_tiny_budget_end_to_end(tmp_path):
  """One seed, the runs in the command's own process (`--parallel 0`; the subprocess runner is tested below):
  an FP checkpoint, then five fine-tunes of it, the JSON and the table."""
  out = tmp_path / 'protocol.json'
  p = subprocess.run([sys.executable, 'experiments/reproduce.py', '--table', 'fashion_mnist_protocol', '--budget', 'tiny',
                      '--seeds', '0', '--parallel', '0', '--workdir_root', str(tmp_path / 'runs'), '--results', str(out)],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  data = json.loads(out.read_text())
  _check_schema(data, [0])
  assert data['budget'] == {'name': 'tiny', 'fp_steps': 6, 'finetune_steps': 4, 'batch_size': 64}
  # every fine-tune started from the seed's one FP checkpoint, at its last step
  assert len({r['init_from'][0]['params_sha256'] for r in data['rows']}) == 1
  assert all(r['init_from'][0]['fp_steps'] == 6 for r in data['rows'])
  rows = {r['name']: r for r in data['rows']}
  assert rows['fp']['mean_sparsity'] == [None] and rows['fp']['scale_range'] == [None]
  # the same threshold rule zeroes about the same share whatever the scale rule (same FP start, 4 steps)
  assert rows['ttq_mean']['mean_sparsity'][0] > rows['ttq_max']['mean_sparsity'][0]
  assert abs(rows['ttq_mean']['mean_sparsity'][0] - rows['twn_mean']['mean_sparsity'][0]) < 0.05
  assert protocol.markdown(data) in p.stdout
  # re-running re-reads the finished runs (nothing trains again)
  again = subprocess.run([sys.executable, 'experiments/reproduce.py', '--table', 'fashion_mnist_protocol', '--budget',
                          'tiny', '--seeds', '0', '--workdir_root', str(tmp_path / 'runs'), '--results', str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and '[run ]' not in again.stdout
  assert 'step 4/4' in (tmp_path / 'runs' / 'fashion_mnist_protocol' / 'tiny' / 'seed_0' / 'ttq_max' / 'run.log').read_text()


def test_a_job_in_this_process_gets_the_config_of_its_command_line():
  """`--parallel 0` trains `Job.config()`, the subprocesses `Job.command()`: the command line's overrides
  applied to its config file's config give the same config."""
  job = protocol.Job('ttq_mean', 2, 'tiny', '/tmp/w', init_from='/tmp/fp')
  cmd = job.command()
  assert cmd[1:5] == ['-m', 'ttq_jax.main', '--config', 'configs/fashion_mnist_protocol.py:ttq_mean,tiny']
  expected = protocol._protocol_config().get_config('ttq_mean,tiny')
  for arg in cmd[7:]:
    key, value = arg[len('--config.'):].split('=', 1)
    setattr(expected, key, type(getattr(expected, key))(value))
  assert job.config().to_dict() == expected.to_dict()
  assert (job.config().seed, job.config().init_from) == (2, '/tmp/fp')


class _ScriptJob(protocol.Job):
  """A job whose command line is a short Python script (no JAX): the subprocess runner's own behaviour."""

  def command(self):
    return [sys.executable, '-c', self.init_from]


def test_the_subprocess_runner_reads_results_logs_output_and_names_a_failure(tmp_path):
  ok = _ScriptJob('fp', 0, 'tiny', str(tmp_path / 'ok'),
                  f"import json; print('trained'); json.dump({{'step': 4}}, open({str(tmp_path / 'ok' / 'result.json')!r}, 'w'))")
  bad = _ScriptJob('ttq_max', 1, 'tiny', str(tmp_path / 'bad'), "import sys; print('first'); sys.exit('the last line')")
  lines = []
  runner = protocol.Runner(2, log=lines.append)
  futures = [runner.submit(ok), runner.submit(bad)]
  assert futures[0].result(timeout=60) == {'step': 4}
  with pytest.raises(RuntimeError, match=r'ttq_max seed 1: exit 1: the last line \(log: .*bad/run.log\)'):
    futures[1].result(timeout=60)
  assert (tmp_path / 'ok' / 'run.log').read_text() == 'trained\n'
  assert sum(l.startswith('[run ]') for l in lines) == 2 and sum(l.startswith('[done]') for l in lines) == 1
  assert protocol.Runner(1, log=lines.append).submit(ok).result(timeout=60) == {'step': 4}  # re-read: not run again
  assert sum(l.startswith('[run ]') for l in lines) == 2


def _fake(values_by_row, seeds=(0, 1, 2)):
  """A results dict with given test top-1 (re-estimated) per row and seed."""
  rows = {}
  for name, values in values_by_row.items():
    rows[name] = {'name': name, 'seeds': list(seeds), 'test_top1_reestimated': values, 'test_top1_running': values}
  return rows


def test_paired_difference_its_t_test_and_holm_by_hand():
  rows = _fake({'ttq_max': [90.0, 91.0, 92.5], 'fp': [89.0, 91.5, 91.0]})
  (p,) = protocol.with_holm({'rows': list(rows.values())})['paired']
  # d = (1.0, -0.5, 1.5): mean 2/3, sample std sqrt(((1/3)^2 + (7/6)^2 + (5/6)^2) / 2) = sqrt(13/12)
  se = np.sqrt(13 / 12) / np.sqrt(3)
  assert (p['a'], p['b']) == ('ttq_max', 'fp') and p['mean'] == pytest.approx(2 / 3, abs=1e-4)
  assert p['stderr'] == pytest.approx(se, abs=1e-4) and p['t'] == pytest.approx((2 / 3) / se)
  assert p['p'] == pytest.approx(1 - p['t'] / np.sqrt(2 + p['t'] ** 2))  # Student's t, 2 degrees of freedom
  # three comparisons in a column: Holm multiplies the smallest p by 3, the next by 2, keeping them monotone
  rows.update(_fake({'twn_max': [92.0, 93.0, 94.1]}))
  rows['fp'] = dict(rows['fp'])
  data = protocol.with_holm({'rows': [rows['fp'], rows['ttq_max'], rows['twn_max']]})
  by_pair = {(t['a'], t['b']): t for t in data['paired']}
  assert set(by_pair) == {('ttq_max', 'fp'), ('twn_max', 'fp'), ('ttq_max', 'twn_max')}
  ps = sorted(t['p'] for t in data['paired'])
  assert sorted(t['p_holm'] for t in data['paired']) == pytest.approx([3 * ps[0], max(3 * ps[0], 2 * ps[1]),
                                                                       max(3 * ps[0], 2 * ps[1], ps[2])])
  assert not by_pair[('ttq_max', 'fp')]['resolved']
  drop = lambda ts: [{k: v for k, v in t.items() if k != 'metric'} for t in ts]
  assert drop(data['paired_running']) == drop(data['paired'])  # (the same values in both columns here)


def test_readme_table_is_the_generated_one():
  """The README shows exactly what `protocol.markdown` makes of the committed CPU results."""
  data = json.load(open(protocol.RESULTS))
  _check_schema(data, data['rows'][0]['seeds'])
  assert data['budget']['name'] == 'cpu' and len(data['rows'][0]['seeds']) >= 3
  assert not protocol.check_same_init(data)
  readme = open(os.path.join(ROOT, 'README.md')).read()
  assert protocol.readme_block(readme) == protocol.markdown(data), (
      'README.md is stale: paste experiments/protocol.py markdown() of experiments/results/fashion_mnist_protocol.json '
      'between the fashion_mnist_protocol markers')


def test_unknown_budget_and_row_are_one_line_errors():
  sys.path.insert(0, ROOT)
  from configs import fashion_mnist_protocol
  with pytest.raises(ValueError, match="budget 'huge' is unknown: allowed are tiny, cpu, gpu"):
    fashion_mnist_protocol.get_config('ttq_max,huge')
  with pytest.raises(ValueError, match="row 'bnn' is unknown: allowed are fp_init, fp, ttq_max"):
    fashion_mnist_protocol.get_config('bnn,cpu')
  c = fashion_mnist_protocol.get_config('twn_max,cpu')
  assert (c.quant.method, c.quant.threshold, c.quant.t, c.num_train_steps, c.learning_rate) == ('twn', 'max', 0.05, 320, 0.05)
  assert c.warm_start_config == 'configs/fashion_mnist_protocol.py:fp_init,cpu' and c.fp_warmup_epochs == 0
  fp = fashion_mnist_protocol.get_config('fp_init,cpu')
  assert (fp.quant.method, fp.num_train_steps, fp.learning_rate, fp.lr_schedule) == ('fp', 858, 0.1, 'cosine')
