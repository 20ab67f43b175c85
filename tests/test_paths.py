"""ttq_jax.paths: the one path format, flattener and selection function, and the two matchings that settings keep."""

import numpy as np

from ttq_jax import paths

TREE = {'conv0': {'kernel': np.zeros(2), 'bias': np.zeros(1)}, 'res1_0': {'conv1': {'kernel': np.ones(3), 'w_p': 1.0}}}


def test_flat_is_sorted_by_path_and_at_walks_it():
  assert list(paths.flat(TREE)) == ['conv0/bias', 'conv0/kernel', 'res1_0/conv1/kernel', 'res1_0/conv1/w_p']
  assert paths.at(TREE, 'res1_0/conv1')['w_p'] == 1.0 and paths.at(TREE, '') is TREE


def test_select_answers_per_leaf_by_path():
  mask = paths.select(TREE, lambda path: path.endswith('kernel'))
  assert paths.flat(mask) == {'conv0/bias': False, 'conv0/kernel': True, 'res1_0/conv1/kernel': True,
                              'res1_0/conv1/w_p': False}


def test_rules_match_the_whole_path_weight_decay_searches_it():
  assert paths.matches('conv0', 'conv0') and not paths.matches('conv', 'conv0')     # module-path rules
  assert not paths.matches('kernel$', 'res1_0/conv1/kernel')
  assert paths.searches('(kernel|w_p|w_n)$', 'res1_0/conv1/w_p')                    # weight_decay_regex
  assert not paths.searches('(kernel|w_p|w_n)$', 'conv0/bias')
