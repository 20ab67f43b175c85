"""Every paper row has a config that loads, validates, carries the spec's hyper-parameters, and runs."""

import importlib

import pytest
import tensorflow_datasets as tfds

from ttq_jax import config_check
from ttq_jax import train

ROWS = ['resnet20_cifar10', 'resnet32_cifar10', 'resnet44_cifar10', 'resnet56_cifar10', 'alexnet_imagenet',
        'resnet18_imagenet', 'fashion_mnist', 'vit_fashion_mnist']


def _config(name, arg=''):
  return importlib.import_module(f'configs.{name}').get_config(arg)


@pytest.mark.parametrize('name', ROWS)
@pytest.mark.parametrize('arg', ['', 'fp'])
def test_configs_validate_and_have_an_fp_twin(name, arg):
  config = _config(name, arg)
  config_check.validate(config)
  assert config.quant.method == ('fp' if arg == 'fp' else 'ttq')
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert 'python -m ttq_jax.main --config configs/' in doc  # the docstring is the command


@pytest.mark.parametrize('n', [20, 32, 44, 56])
def test_cifar_rows_follow_the_official_scripts(n):
  c = _config(f'resnet{n}_cifar10')
  assert c.model.name == f'resnet{n}' and c.data.name == 'cifar10'
  assert (c.batch_size, c.learning_rate, c.momentum, c.weight_decay, c.quant.t) == (256, 0.1, 0.9, 2e-4, 0.05)
  assert tuple(c.lr_boundaries_epochs) == (80.0, 120.0, 300.0) and c.data.crop_padding == 4
  assert c.normalize_init and c.decay_scales


def test_alexnet_row_follows_the_official_log():
  c = _config('alexnet_imagenet')
  assert (c.optimizer, c.learning_rate, c.adam_eps, c.batch_size, c.weight_decay) == ('adam', 1e-4, 1e-5, 128, 5e-6)
  assert tuple(c.lr_boundaries_epochs) == (56.0, 64.0) and tuple(c.lr_values) == (2e-5, 4e-6)
  assert not c.model.quantize_first_last
  import re
  pattern = re.compile(c.weight_decay_regex)
  assert pattern.search('TernaryDense_0/kernel') and pattern.search('Dense_0/kernel')
  assert not pattern.search('TernaryConv_1/kernel')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet20_cifar10', 'alexnet_imagenet'])
def test_runlocal_variants_train_on_mock_data(name, tmp_path):
  config = _config(name, 'runlocal')
  config.mesh_shape = (1, 1)
  config.compilation_cache_dir = ''
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 4 and result['num_examples'] > 0 and result['sparsity']
