"""Paper-row recipes: what each config runs (computed from it) is the official recipe, docs/recipes.md is
that description today, and the TTQ rows that fine-tune refuse to start from scratch."""

import json
import os
import subprocess
import sys

import pytest

from ttq_jax import config_check
from configs import paper_rows
from ttq_jax import recipes
from ttq_jax import train
from ttq_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def described():
  return [paper_rows.describe_row(row) for row in paper_rows.PAPER_ROWS]


def test_docs_recipes_md_is_what_the_configs_describe(described):
  with open(os.path.join(ROOT, 'docs', 'recipes.md')) as f:
    committed = f.read()
  assert committed == recipes.markdown(described, paper_rows.PAPER_ROWS) + '\n', (
      'docs/recipes.md is stale: python experiments/reproduce.py --table paper --describe --markdown docs/recipes.md')


@pytest.mark.parametrize('name', [r.name for r in paper_rows.PAPER_ROWS if 'CIFAR' in r.name or 'AlexNet' in r.name])
def test_cifar_and_alexnet_rows_run_the_official_recipe(described, name):
  row = next(r for r in paper_rows.PAPER_ROWS if r.name == name)
  d = next(d for d in described if d['name'] == name)
  assert set(row.official) == set(recipes.FIELDS)  # every field has an official value and a source
  for field, (official, source) in row.official.items():
    assert d[field] == official, f'{name}: {field} is {d[field]!r}, officially {official!r} ({source})'


def test_describe_numbers_by_hand(described):
  """Spot checks against the official log, independent of the table in configs/paper_rows.py."""
  ttq20 = next(d for d in described if d['name'] == 'ResNet-20 CIFAR-10 TTQ')
  assert ttq20['lr_boundaries_steps'][0] == 390 and ttq20['total_steps'] == 400 * 390
  assert len(ttq20['ternary_layers']) == 19 and 'linear/kernel' in ttq20['ternary_layers']  # 18 convs + linear
  assert ttq20['full_precision_layers'] == ['conv0/kernel'] and ttq20['warm_start'] == 'required'
  assert {'linear/w_p', 'linear/w_n', 'res2_1/conv1/w_p'} <= set(ttq20['weight_decay_params'])
  assert not any('bn' in p or p.endswith('bias') for p in ttq20['weight_decay_params'])
  fp20 = next(d for d in described if d['name'] == 'ResNet-20 CIFAR-10 FP')
  # tensorpack's cifar10-resnet.py: tf.Variable(0.01), and its (1, 0.1) applies from logged epoch 2
  assert fp20['base_learning_rate'] == 0.01 and fp20['lr_boundaries_steps'][0] == 390 and fp20['lr_values'][0] == 0.1
  assert fp20['bn_unbiased_variance'] and fp20['bn_bias_init'] == 'uniform_unit_scaling'
  alex = next(d for d in described if d['name'] == 'AlexNet ImageNet TTQ')
  assert alex['lr_boundaries_steps'] == [56 * 10_000, 64 * 10_000] and alex['threshold_t'] == 0.049
  assert alex['threshold'] == 'max' and alex['threshold_k'] is None
  assert 'conv1/w_p' not in alex['weight_decay_params'] and 'fc1/w_n' in alex['weight_decay_params']


@pytest.mark.parametrize('config', ['configs/resnet20_cifar10.py', 'configs/resnet56_cifar10.py',
                                    'configs/resnet18_imagenet.py'])
def test_fine_tuning_rows_refuse_to_train_from_scratch(config, tmp_path):
  c = paper_rows.load_config(config)
  with pytest.raises(ConfigError, match=f'first run `python -m ttq_jax.main --config {config}:fp'):
    train.train_and_evaluate(c, str(tmp_path / 'wd'))
  assert not os.path.exists(tmp_path / 'wd')  # refused before anything is written
  c.init_from = str(tmp_path / 'fp')
  config_check.check_warm_start(c)  # with a warm start it is allowed


def test_warm_start_refusal_is_one_line_from_the_cli(tmp_path):
  p = subprocess.run([sys.executable, '-m', 'ttq_jax.main', '--config', 'configs/resnet20_cifar10.py',
                      '--workdir', str(tmp_path / 'wd')], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode != 0
  errors = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert 'Traceback' not in p.stderr and len(errors) == 1, p.stderr
  assert 'init_from is empty' in errors[0] and 'resnet20_cifar10.py:fp' in errors[0]


@pytest.mark.slow
def test_describe_cli_writes_the_json(tmp_path):
  out = tmp_path / 'rows.json'
  subprocess.run([sys.executable, 'experiments/reproduce.py', '--table', 'paper', '--describe', '--json', str(out)],
                 cwd=ROOT, check=True, capture_output=True, timeout=600)
  rows = json.loads(out.read_text())['rows']
  assert [r['name'] for r in rows] == [r.name for r in paper_rows.PAPER_ROWS]
  keys = {'name', 'config', 'method', 'global_batch_size', 'total_steps', 'lr_boundaries_steps', 'lr_values',
          'base_learning_rate', 'weight_optimizer', 'scale_optimizer', 'weight_decay', 'weight_decay_params',
          'ternary_layers', 'full_precision_layers', 'warm_start', 'normalize_init', 'threshold', 'threshold_t', 'threshold_k', 'dtype'}
  assert all(keys <= set(r) for r in rows)
  assert rows[1]['scale_optimizer'] == {'name': 'sgd', 'learning_rate': 2e-4, 'momentum': 0.9, 'nesterov': False}
