"""Bring your own model, data and loss (experiments/byo_model.py, smoke mode): a Flax model ttq_jax has
never seen trains with TTQ through one quantize() call, its FP checkpoint warm-starts it, it resumes,
exports with per-channel scales and reloads."""

import os
import sys

import flax.linen as nn
import pytest

from tests.conftest import ROOT, metrics_rows


@pytest.mark.slow
def test_byo_example_end_to_end(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import byo_model
  from ttq_jax import quant
  from ttq_jax import train
  from ttq_jax.errors import CheckpointError

  out = byo_model.run(str(tmp_path), smoke=True)
  ttq, summary, from_file = out['ttq'], out['export'], out['from_file']
  assert sorted(ttq['sparsity']) == ['conv_0/kernel', 'conv_1/kernel']  # the stem and classifier stay FP
  assert all(summary['layers'][f'params/conv_{i}/kernel']['per_channel'] for i in (0, 1))
  assert from_file['top1_accuracy'] == ttq['top1_accuracy']
  assert from_file['loss'] == pytest.approx(ttq['loss'], rel=1e-5)
  # warm start: the first TTQ step starts from the FP run's trained weights, not from a fresh init
  fp_rows, ttq_rows = metrics_rows(tmp_path / 'fp'), metrics_rows(tmp_path / 'ttq')
  assert ttq_rows[0]['train_loss'] < fp_rows[0]['train_loss']

  data, config = byo_model.make_data(), byo_model.make_config(smoke=True)
  config.init_from = str(tmp_path / 'fp')
  model = quant.quantize(byo_model.Net(), byo_model.RULES)
  again = train.train_and_evaluate(config, str(tmp_path / 'ttq'), model=model, data=data,
                                   loss_fn=byo_model.smoothed_cross_entropy)  # resumes at the end
  assert again['step'] == ttq['step'] and again['loss'] == pytest.approx(ttq['loss'], rel=1e-6)
  assert metrics_rows(tmp_path / 'ttq') == ttq_rows  # nothing trained twice

  class Other(nn.Module):  # kernels the FP checkpoint does not have
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(10, name='classifier')(nn.Conv(8, (3, 3), name='conv_0')(x).mean(axis=(1, 2)))
  with pytest.raises(CheckpointError, match='has no kernel of the same path and shape for 2 of this model'):
    train.train_and_evaluate(config, str(tmp_path / 'other'), model=quant.quantize(Other(), byo_model.RULES), data=data)
