"""What earlier versions wrote still reads, to the same numbers.

`tests/data/workdir_0_2` was written by ttq_jax 0.2 (commit 166eb74, before the method table, the input
pipeline split and BitNet): `configs/fashion_mnist.py:smoke` trained 4 steps (`--config.num_train_steps=4
--config.checkpoint_every_steps=4 --config.keep_checkpoints=1`), then `--mode eval` (eval/step_4.json) and
`--mode export` (export/model.safetensors), and the logits of the export on the first 16 Fashion-MNIST test
images (export/logits_test16.npy), all by that version's code.
"""

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import ROOT
from ttq_jax import datasets
from ttq_jax import evaluation
from ttq_jax import export

FIXTURE = os.path.join(ROOT, 'tests', 'data', 'workdir_0_2')


@pytest.fixture
def workdir(tmp_path):
  path = str(tmp_path / 'workdir_0_2')
  shutil.copytree(FIXTURE, path)  # evaluation writes eval/*.json: never into the checkout
  return path


def test_a_0_2_checkpoint_evaluates_to_the_same_numbers(workdir):
  with open(os.path.join(FIXTURE, 'eval', 'step_4.json')) as f:
    then = json.load(f)
  now = evaluation.evaluate_workdir(None, workdir)  # the saved config.json decides (it lacks today's new keys)
  assert now['step'] == then['step'] == 4 and now['bn_statistics'] == then['bn_statistics']
  n = then['num_examples']
  assert now['num_examples'] == n and round(now['top1_accuracy'] * n) == round(then['top1_accuracy'] * n)
  assert now['loss'] == pytest.approx(then['loss'], rel=1e-5)
  assert now['sparsity'] == pytest.approx(then['sparsity'])


def test_a_0_2_export_loads_to_the_same_logits():
  model, variables = export.load(os.path.join(FIXTURE, 'export', 'model.safetensors'))
  images, _ = datasets.load_fashion_mnist('test')
  x = datasets.normalize(images[:16], datasets.dataset_info('fashion_mnist'))
  then = np.load(os.path.join(FIXTURE, 'export', 'logits_test16.npy'))
  np.testing.assert_allclose(np.asarray(model.apply(variables, x, train=False)), then, rtol=1e-5, atol=1e-5)
