"""The reporting protocol: final / best / mean of the last 5 evaluations of the trained model, per BN
column, from a metrics file written by hand."""

import json

import numpy as np
import pytest

from ttq_jax import reports


def _write(path, rows):
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def test_protocol_counts_only_ternary_evaluations_per_column(tmp_path):
  rows = [
      {'step': 10, 'train_loss': 1.0},
      {'step': 20, 'eval_top1_accuracy': 0.95, 'eval_bnre_top1_accuracy': 0.96, 'eval_ternary': 0.0},  # FP warm-up
      {'step': 30, 'eval_top1_accuracy': 0.70, 'eval_bnre_top1_accuracy': 0.80, 'eval_ternary': 1.0},
      {'step': 40, 'eval_top1_accuracy': 0.75, 'eval_bnre_top1_accuracy': 0.81, 'eval_ternary': 1.0},
      {'step': 50, 'eval_top1_accuracy': 0.90, 'eval_bnre_top1_accuracy': 0.82, 'eval_ternary': 1.0},
      {'step': 60, 'eval_top1_accuracy': 0.85, 'eval_bnre_top1_accuracy': 0.88, 'eval_ternary': 1.0},
      {'step': 70, 'eval_top1_accuracy': 0.80, 'eval_bnre_top1_accuracy': 0.83, 'eval_ternary': 1.0},
      {'step': 80, 'eval_top1_accuracy': 0.90, 'eval_bnre_top1_accuracy': 0.84, 'eval_ternary': 1.0},
      {'step': 90, 'eval_top1_accuracy': 0.10, 'eval_ternary': 1.0},  # this evaluation without re-estimation
  ]
  p = reports.eval_protocol(reports.read_metrics(_write(tmp_path / 'metrics.jsonl', rows)))
  # running: ternary evals 0.70 .75 .90 .85 .80 .90 .10; the FP warm-up's 0.95 never counts
  assert p['running']['final'] == 0.10 and p['running']['num_evals'] == 7
  assert p['running']['best'] == 0.90 and p['running']['best_step'] == 50  # the earliest of equal bests
  assert p['running']['mean_last5'] == pytest.approx((0.90 + 0.85 + 0.80 + 0.90 + 0.10) / 5)
  assert p['reestimated'] == {'final': 0.84, 'best': 0.88, 'best_step': 60, 'num_evals': 6,
                              'mean_last5': pytest.approx((0.81 + 0.82 + 0.88 + 0.83 + 0.84) / 5)}


def test_protocol_of_a_full_precision_run_counts_every_evaluation(tmp_path):
  rows = [{'step': s, 'eval_top1_accuracy': a, 'eval_ternary': 0.0} for s, a in ((1, 0.5), (2, 0.7), (3, 0.6))]
  p = reports.eval_protocol(rows)
  assert p == {'running': {'final': 0.6, 'best': 0.7, 'best_step': 2, 'mean_last5': pytest.approx(0.6),
                           'num_evals': 3}}


def test_read_metrics_keeps_the_last_row_of_a_step(tmp_path):
  """A resumed run rewrites the steps it redoes: the later row wins."""
  path = _write(tmp_path / 'm.jsonl', [{'step': 2, 'x': 1}, {'step': 4, 'x': 2}, {'step': 4, 'x': 3}])
  assert reports.read_metrics(path) == [{'step': 2, 'x': 1}, {'step': 4, 'x': 3}]


def test_final_table_names_each_layers_rule_and_activations():
  """The rule column is the layer's `quant.rule_settings`: method, threshold rule and its factor, and the
  activations when they are quantized; scales as reported (BitNet: 1 / s twice)."""
  from configs import fashion_mnist
  from ttq_jax import quant
  config = fashion_mnist.get_config('smoke')
  rules = {'a/kernel': quant.rule_settings(quant.Rule(method='bitnet', activations='int8')),
           'b/kernel': quant.rule_settings(quant.QuantConfig(t=0.1))}
  assert rules['a/kernel'] == {'method': 'bitnet', 'threshold': 'absmean', 'activations': 'int8'}
  result = {'step': 6, 'loss': 1.0, 'top1_accuracy': 0.5, 'num_examples': 8, 'layer_rules': rules,
            'sparsity': {'a/kernel': 0.25, 'b/kernel': 0.5}, 'scales': {'a/kernel': (0.2, 0.2), 'b/kernel': (1.5, 0.5)}}
  table = reports.format_eval_table(result, config).splitlines()
  row = lambda name: next(l.split() for l in table if l.startswith(name + ' '))
  assert row('a') == ['a', 'bitnet', 'absmean', 'act=int8', '0.250', '+0.2000', '+0.2000']
  assert row('b') == ['b', 'ttq', 'max', 't=0.1', '0.500', '+1.5000', '+0.5000']


def test_code_dynamics_by_hand():
  """near_threshold: | |w| - delta | <= 0.1 delta with the delta in force (TTQ: 0.05 max|w| = 0.1 per tensor;
  ParetoQ per channel: alpha / 3); flip_rate: absent on the first call, then the fraction of codes that changed."""
  from ttq_jax.quant import QuantConfig, TernaryLayer
  ttq_kernel = np.array([2.0, 0.1, 0.095, 0.105, 0.111, -0.092, 0.5, 0.0], np.float32)  # in band: 0.1 .095 .105 -.092
  # ParetoQ, 2 output channels: alpha = (3, 0.3) -> delta = (1, 0.1); in band: 1.05, 0.095 (0.5, 0.2, -0.3, 0.12 not)
  pq_kernel = np.array([[1.05, 0.095], [0.5, 0.2], [-0.3, -0.12]], np.float32)
  params = {'a': {'kernel': ttq_kernel, 'w_p': np.float32(1.0), 'w_n': np.float32(1.0)},
            'b': {'kernel': pq_kernel, 'alpha': np.array([3.0, 0.3], np.float32)}}
  layers = (TernaryLayer('a', QuantConfig()), TernaryLayer('b', QuantConfig(method='paretoq', scale_granularity='channel'),
                                                           (1, 2)))
  dynamics = reports.CodeDynamics()
  first = dynamics.scalars(params, layers)
  assert first == pytest.approx({'near_threshold/a': 4 / 8, 'near_threshold/b': 2 / 6})
  params['a']['kernel'] = ttq_kernel * np.array([1, 1, 1, 1, 1, 1, -1, 1], np.float32) + np.array([0, 0, 0.01, 0, 0, 0, 0, 0])
  params['b']['alpha'] = np.array([3.0, 0.7], np.float32)  # delta 0.233: 0.2 and -0.12 flip to zero... 0.2 was +1
  second = dynamics.scalars(params, layers)
  # a: 0.5 -> -0.5 flips, 0.095 -> 0.105 crosses 0.1 (0 -> +1): 2 of 8; b: codes before [[1, 0], [0, 1], [0, -1]], after
  # u = w / a: 0.2 / 0.7 = 0.29 and 0.12 / 0.7 = 0.17 -> 0: 2 of 6
  assert second['flip_rate/a'] == pytest.approx(2 / 8) and second['flip_rate/b'] == pytest.approx(2 / 6)


def test_rules_differ_from_config_names_the_first_layer_and_the_setting():
  """The warning a run with your own quantized model prints when config.quant says otherwise; silent when equal."""
  import ml_collections
  from ttq_jax.quant import QuantConfig, TernaryLayer
  config = ml_collections.ConfigDict({'quant': {'method': 'ttq', 'threshold': None, 't': 0.05, 'k': 0.7, 'sparsity': 0.5,
                                                'scale_granularity': 'tensor'}})
  same = (TernaryLayer('a', QuantConfig()), TernaryLayer('b', QuantConfig()))
  assert reports.rules_differ_from_config(same, config) == ''
  layers = (TernaryLayer('a', QuantConfig()), TernaryLayer('b/c', QuantConfig(t=0.1, scale_granularity='channel')))
  message = reports.rules_differ_from_config(layers, config)
  assert message.startswith("config.quant is not what the model's rules do (layer 'b/c': t 0.05 -> 0.1, "
                            "scale_granularity None -> 'channel')")
  config.quant.method = 'bitnet'
  assert "layer 'a': method 'bitnet' -> 'ttq', threshold 'absmean' -> 'max'" in reports.rules_differ_from_config(same, config)


@pytest.mark.parametrize('rules,ternary,expected', [
    ({'a/kernel': {'method': 'bitnet'}, 'b/kernel': {'method': 'bitnet'}}, 10, 'bitnet'),   # config says ttq
    ({'a/kernel': {'method': 'bitnet'}, 'b/kernel': {'method': 'ttq'}, 'c/kernel': {'method': 'ttq'}}, 10,
     'mixed: bitnet (1 layers), ttq (2 layers)'),
    ({}, 0, 'none (no layer is ternary)'),                                                 # nothing selected
])
def test_the_summary_names_the_methods_the_layers_used(smoke_config, rules, ternary, expected):
  result = {'layer_rules': rules, 'param_counts': {'ternary': ternary, 'full_precision': 5}}
  assert reports.method_line(result, smoke_config) == expected
