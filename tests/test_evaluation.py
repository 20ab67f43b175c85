"""Evaluation: BN moments are the batch statistics; eval sums and top-k by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttq_jax import evaluation
from ttq_jax import input_pipeline
from ttq_jax import models
from ttq_jax import state as state_lib


class BNOnly(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    return nn.BatchNorm(use_running_average=not train, momentum=models.BN_MOMENTUM)(x)


def test_batch_moments_are_the_batch_statistics():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 3)) * jnp.array([1.0, 2.0, 3.0]) + 5.0
  model = BNOnly()
  variables = model.init(jax.random.PRNGKey(1), x)
  state = state_lib.TrainState.create(apply_fn=model.apply, params=variables['params'], tx=optax.sgd(0.1),
                                      batch_stats=variables['batch_stats'])
  info = input_pipeline.DatasetInfo(2, (3,), 1, 1, (0.0,), (1.0,))
  stats = evaluation.batch_moments_step(state, {'image': x}, apply_fn=model.apply, info=info, dtype=jnp.float32)
  np.testing.assert_allclose(stats['BatchNorm_0']['mean'], x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats['BatchNorm_0']['var'], x.var(0), rtol=1e-4)


@pytest.mark.parametrize('k,expected', [(1, [1.0, 0.0, 0.0]), (2, [1.0, 1.0, 0.0]), (3, [1.0, 1.0, 1.0])])
def test_topk_correct(k, expected):
  logits = jnp.array([[0.1, 0.9, 0.0], [0.5, 0.3, 0.2], [0.2, 0.3, 0.1]])
  labels = jnp.array([1, 1, 2])  # ranks 1, 2, 3
  np.testing.assert_array_equal(evaluation.topk_correct(logits, labels, k), expected)


def test_eval_step_sums_over_valid_rows_only():
  class Fixed(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return jnp.stack([x[:, 0], -x[:, 0]] + [jnp.zeros_like(x[:, 0])] * 5, axis=-1)  # 7 classes
  model = Fixed()
  state = state_lib.TrainState.create(apply_fn=model.apply, params={}, tx=optax.identity(), batch_stats={})
  info = input_pipeline.DatasetInfo(7, (1,), 1, 1, (0.0,), (1.0,))
  batch = {'image': jnp.array([[2.0], [-3.0], [1.0]]), 'label': jnp.array([0, 0, 1]),
           'mask': jnp.array([1.0, 1.0, 0.0])}
  out = evaluation.eval_step(state, batch, apply_fn=model.apply, info=info, dtype=jnp.float32)
  logits = jnp.array([[2.0, -2.0] + [0.0] * 5, [-3.0, 3.0] + [0.0] * 5])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 0]))
  assert float(out['count']) == 2.0 and float(out['top1_correct']) == 1.0
  assert float(out['loss']) == pytest.approx(float(loss.sum()), rel=1e-6)
  assert float(out['top5_correct']) == 1.0  # the second row's label ranks 7th of 7
