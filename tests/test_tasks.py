"""The tasks of ttq_jax/tasks.py by value: next-byte cross-entropy and bits per byte over masked positions by hand,
the classification sums, and selection by the task's metric and direction."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import datasets
from ttq_jax import reports
from ttq_jax import tasks

BYTES = datasets.DatasetInfo(256, (3,), 10, 10, (), (), reader='text', task='next_byte', input_dtype='int32')


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_next_byte_inputs_targets_and_bits_per_byte_by_hand():
  task = tasks.TASKS['next_byte']
  tokens = np.array([[10, 11, 12, 13], [20, 21, 22, 0]], np.int32)  # the second window padded: its last byte masked
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  np.testing.assert_array_equal(task.inputs({'tokens': tokens}, BYTES, jnp.float32), tokens[:, :-1])
  np.testing.assert_array_equal(task.targets({'tokens': tokens}), tokens[:, 1:])
  logits = np.random.default_rng(0).normal(size=(2, 3, 256)).astype(np.float32)
  logits[0, 1, 12] = 9.0  # predicts byte 12 at position 1 of window 0 (argmax hit)
  targets = tokens[:, 1:]
  nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
  sums = task.eval_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), BYTES)
  assert float(sums['count']) == 5
  np.testing.assert_allclose(float(sums['loss']), (nll * mask).sum(), rtol=1e-5)
  assert 'top1_correct' not in sums  # the LM's metrics are its own: no classification accuracy
  m = task.metrics({k: np.asarray(v) for k, v in sums.items()})
  assert 'top1_accuracy' not in m
  np.testing.assert_allclose(m['bits_per_byte'], (nll * mask).sum() / 5 / math.log(2), rtol=1e-5)
  assert m['num_bytes'] == 5 and 'num_examples' not in m and 'top5_accuracy' not in m
  train = task.train_metrics(jnp.float32(2.0), jnp.asarray(logits), jnp.asarray(targets), BYTES)
  np.testing.assert_allclose(float(train['train_bits_per_byte']), 2.0 / math.log(2), rtol=1e-6)
  assert set(train) == {'train_loss', 'train_bits_per_byte'}
  info = BYTES
  assert task.throughput_scalars(2.0, 8, info) == {'steps_per_second': 2.0, 'bytes_per_second': 2.0 * 8 * info.input_shape[0]}
  assert tasks.TASKS['classify'].throughput_scalars(2.0, 8, info) == {'steps_per_second': 2.0, 'images_per_second': 16.0}


def test_classify_sums_count_examples_and_report_top5_above_five_classes():
  task = tasks.TASKS['classify']
  info = datasets.DATASETS['imagenet2012']
  logits = jnp.asarray(np.eye(6, 1000, dtype=np.float32)[[0, 1, 2]])  # example i: class i highest
  labels, mask = jnp.asarray([0, 5, 2]), jnp.asarray([1.0, 1.0, 0.0])
  sums = task.eval_sums(logits, labels, mask, info)
  assert float(sums['count']) == 2 and float(sums['top1_correct']) == 1 and float(sums['top5_correct']) == 2  # label 5: one logit above it
  m = task.metrics({k: np.asarray(v) for k, v in sums.items()})
  assert m['top1_accuracy'] == 0.5 and m['num_examples'] == 2 and 'bits_per_byte' not in m


@pytest.mark.parametrize('metric,higher,expected_best,expected_step', [
    ('top1_accuracy', True, 0.9, 20),   # the highest, the earliest of equal bests
    ('bits_per_byte', False, 2.0, 10),  # the lowest
])
def test_protocol_selects_by_the_tasks_direction(metric, higher, expected_best, expected_step):
  values = {10: (0.5, 2.0), 20: (0.9, 3.0), 30: (0.9, 2.5)}
  rows = [{'step': s, 'eval_ternary': 1.0, f'eval_{metric}': v[0] if metric == 'top1_accuracy' else v[1]}
          for s, v in values.items()]
  p = reports.eval_protocol(rows, metric=metric, higher_is_better=higher)['running']
  assert (p['best'], p['best_step']) == (expected_best, expected_step)
  task = next(t for t in tasks.TASKS.values() if t.metric == metric)
  assert task.higher_is_better is higher and task.better(expected_best, p['final']) is (expected_best != p['final'])


def test_every_dataset_names_a_task():
  assert {info.task for info in datasets.DATASETS.values()} <= set(tasks.TASKS)
  assert datasets.DATASETS['python_docs'].task == 'next_byte' and datasets.DATASETS['cifar10'].task == 'classify'
