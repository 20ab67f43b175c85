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
  assert config.dtype == 'float32'  # paper rows compute in float32 (bfloat16 is the :bf16 variant)
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert 'python -m ttq_jax.main --config configs/' in doc  # the docstring is the command


# The paper rows' hyper-parameters are checked against the official code in tests/test_recipes.py.


def test_fashion_mnist_paper_variant_is_the_official_cifar_recipe_scaled():
  """Same batch and steps as the quickstart; official optimizer, decay, scales and layout; `:paper_steps`
  also the official schedule's shape."""
  ours, paper = _config('fashion_mnist'), _config('fashion_mnist', 'paper_steps')
  assert _config('fashion_mnist', 'paper').lr_schedule == ours.lr_schedule == 'cosine'
  assert (paper.batch_size, paper.num_epochs, paper.fp_warmup_epochs) == (ours.batch_size, ours.num_epochs,
                                                                          ours.fp_warmup_epochs)
  assert (paper.optimizer, paper.nesterov, paper.momentum, paper.scale_optimizer) == ('sgd', False, 0.9, 'same')
  assert (paper.weight_decay, paper.weight_decay_regex, paper.normalize_init) == (2e-4, r'(kernel|w_p|w_n)$', False)
  assert (paper.quant.w_p_init, paper.quant.full_precision_layers, paper.ternary_kernel_lr_multiplier) == (1.0, 'conv0', 1.0)
  # each phase: 0.1, then x0.1 after 82/400 and 123/400, 2e-4 after 300/400; TTQ's first 1/400 at 2e-4
  assert paper.lr_boundaries_epochs == pytest.approx((0.205, 0.3075, 0.75, 1.0025, 1.205, 1.3075, 1.75))
  assert tuple(paper.lr_values) == (0.01, 0.001, 0.0002, 0.1, 0.01, 0.001, 0.0002)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet20_cifar10', 'alexnet_imagenet'])
def test_runlocal_variants_train_on_mock_data(name, tmp_path):
  """CIFAR-10 on tfds mock data; ImageNet on generated JPEGs in tfds ArrayRecord (`ttq_jax.imagenet_like`),
  decoded and augmented by 2 worker processes for training, BN re-estimation and evaluation."""
  config = _config(name, 'runlocal')
  config.mesh_shape = (1, 1)
  config.compilation_cache_dir = ''
  if name == 'alexnet_imagenet':
    from ttq_jax import imagenet_like
    imagenet_like.write(str(tmp_path / 'data'), train_examples=32, validation_examples=16, sizes=((90, 120),),
                        size_weights=(1,))
    config.data.data_dir, config.data.worker_processes = str(tmp_path / 'data'), 2
    result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  else:
    with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
      result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 4 and result['num_examples'] > 0 and result['sparsity']


# Every config variant that existed before the threshold became a choice, and the rule it ran: TTQ's max with
# its t, TWN's mean with k = 0.7 (the old `twn_ternarize`), whatever `quant.threshold` / `t` said.
OWN_RULES = [
    ('fashion_mnist', '', 'max', 0.05), ('fashion_mnist', 'twn', 'mean', 0.7), ('fashion_mnist', 'paper', 'max', 0.05),
    ('fashion_mnist', 'paper_steps', 'max', 0.05), ('fashion_mnist', 'smoke', 'max', 0.05),
    ('resnet20_cifar10', '', 'max', 0.05), ('resnet20_cifar10', 'twn', 'mean', 0.7),
    ('alexnet_imagenet', '', 'max', 0.049), ('alexnet_imagenet', 'twn', 'mean', 0.7),
    ('resnet18_imagenet', '', 'max', 0.05), ('resnet18_imagenet', 'twn', 'mean', 0.7),
    ('vit_fashion_mnist', '', 'max', 0.05),
]


@pytest.mark.parametrize('name,arg,rule,factor', OWN_RULES)
def test_existing_configs_keep_their_threshold_rule(name, arg, rule, factor):
  import numpy as np
  from ttq_jax import quant
  from ttq_jax import state as state_lib
  config = _config(name, arg)
  q = state_lib.quant_config(config)
  assert config.quant.threshold is None and q.threshold_rule == rule
  assert (q.t if rule == 'max' else q.k) == factor
  w = np.linspace(-1.0, 2.0, 31, dtype=np.float32)
  expected = factor * (np.abs(w).max() if rule == 'max' else np.abs(w).mean())
  assert float(quant.threshold(w, q)) == pytest.approx(expected, rel=1e-6)
