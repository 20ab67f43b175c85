"""Every shipped config selects the same parameters as when `tests/data/masks.json` was written (commit 3ce103c,
before the parameter-path code was unified): weight decay, the optimizer's scale group, the latent kernels the
ternary-kernel learning-rate multiplier scales, and the ternary layers. Regenerate only on purpose:
`python -m tests.test_masks` (and say why in the commit)."""

import json
import os

import jax
import pytest
from flax import traverse_util

from tests.conftest import ROOT, write_text_corpus

FIXTURE = os.path.join(ROOT, 'tests', 'data', 'masks.json')
CASES = [('fashion_mnist', a) for a in ('', 'fp', 'twn', 'bitnet', 'paper', 'smoke')] + \
        [(f'resnet{d}_cifar10', a) for d in (20, 32, 44, 56) for a in ('', 'fp', 'twn')] + \
        [('alexnet_imagenet', a) for a in ('', 'fp', 'twn')] + [('resnet18_imagenet', a) for a in ('', 'fp', 'twn')] + \
        [('vit_fashion_mnist', a) for a in ('', 'fp', 'smoke')] + \
        [('lm', a) for a in ('', 'fp', 'ttq', 'twn', 'bitnet', 'paretoq', 'bitnet_a8', 'ttq_a8', 'nnx', 'smoke')]


def masks_of(name: str, arg: str, corpus: str) -> dict:
  """{mask name: sorted '/'-joined paths where it is True} of config `name`:`arg`'s model (shapes only)."""
  import importlib
  from ttq_jax import datasets, optim, state as state_lib
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  if config.data.name == 'python_docs':
    config.data.data_dir = corpus
  model = state_lib.create_model(config)
  info = datasets.dataset_info(config.data)
  layers = state_lib.ternary_layers(model, info)
  params = jax.eval_shape(lambda: state_lib.init_variables(model, jax.random.PRNGKey(0), info))['params']
  trees = {'weight_decay': optim.weight_decay_mask(params, config.weight_decay_regex),
           'scale_group': jax.tree.map(lambda label: label == 'scale', optim.param_labels(params, layers)),
           'ternary_kernel': optim.ternary_kernel_mask(params, layers)}
  out = {k: sorted(p for p, v in traverse_util.flatten_dict(t, sep='/').items() if v) for k, t in trees.items()}
  out['ternary_layers'] = [layer.path for layer in layers]
  out['params'] = len(traverse_util.flatten_dict(params))
  return out


@pytest.mark.parametrize('name,arg', CASES, ids=[f'{n}:{a}' for n, a in CASES])
def test_config_selects_the_same_parameters_as_before(name, arg, text_corpus):
  with open(FIXTURE) as f:
    expected = json.load(f)[f'{name}:{arg}']
  assert masks_of(name, arg, text_corpus) == expected


if __name__ == '__main__':
  import tempfile
  corpus = write_text_corpus(tempfile.mkdtemp())
  with open(FIXTURE, 'w') as f:
    json.dump({f'{n}:{a}': masks_of(n, a, corpus) for n, a in CASES}, f, indent=0, sort_keys=True)
  print('wrote', FIXTURE)
