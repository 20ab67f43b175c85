"""What earlier versions wrote still reads, to the same numbers.

`tests/data/workdir_0_2` was written by ttq_jax 0.2 (commit 166eb74, before the method table, the input
pipeline split and BitNet): `configs/fashion_mnist.py:smoke` trained 4 steps (`--config.num_train_steps=4
--config.checkpoint_every_steps=4 --config.keep_checkpoints=1`), then `--mode eval` (eval/step_4.json) and
`--mode export` (export/model.safetensors), and the logits of the export on the first 16 Fashion-MNIST test
images (export/logits_test16.npy), all by that version's code.

`tests/data/workdir_0_3_lm` and `workdir_0_3_bitnet` were written at commit 6050e77 (before the workdir, run and
loop modules were split out of config_check, state and train): `python -m ttq_jax.main --config
configs/lm.py:smoke --config.data.data_dir=CORPUS` (CORPUS: `conftest.write_text_corpus`, what the tests read) and
`--config configs/fashion_mnist.py:smoke --config.quant.method=bitnet`, each with `--config.num_train_steps=4
--config.checkpoint_every_steps=4 --config.keep_checkpoints=1`, then `--mode eval` and `--mode export`, and the
export's logits by `export.load` (LM: on the first 32 bytes of `b'The function returns the default value of the
object'`; BitNet: on the first 16 Fashion-MNIST test images).
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
LM, BITNET = (os.path.join(ROOT, 'tests', 'data', f'workdir_0_3_{n}') for n in ('lm', 'bitnet'))


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


@pytest.mark.parametrize('fixture', ['workdir_0_2', 'workdir_0_3_bitnet'])
def test_an_earlier_image_export_loads_to_the_same_logits(fixture):
  fixture = os.path.join(ROOT, 'tests', 'data', fixture)
  model, variables = export.load(os.path.join(fixture, 'export', 'model.safetensors'))
  images, _ = datasets.load_fashion_mnist('test')
  x = datasets.normalize(images[:16], datasets.dataset_info('fashion_mnist'))
  then = np.load(os.path.join(fixture, 'export', 'logits_test16.npy'))
  np.testing.assert_allclose(np.asarray(model.apply(variables, x, train=False)), then, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['lm', 'bitnet'])
def test_a_0_3_checkpoint_evaluates_to_the_same_numbers(name, tmp_path, text_corpus):
  fixture = LM if name == 'lm' else BITNET
  workdir = str(tmp_path / name)
  shutil.copytree(fixture, workdir)
  with open(os.path.join(fixture, 'eval', 'step_4.json')) as f:
    then = json.load(f)
  config = None
  if name == 'lm':  # the corpus it read (the tests' generated one) is in another folder here: data.data_dir may change
    from ttq_jax import workdirs
    config = workdirs.workdir_config(None, workdir).copy_and_resolve_references()
    config.data.data_dir = text_corpus
  now = evaluation.evaluate_workdir(config, workdir)
  assert now['step'] == then['step'] == 4 and now['layer_rules'] == then['layer_rules']
  metric = 'bits_per_byte' if name == 'lm' else 'top1_accuracy'
  assert now[metric] == pytest.approx(then[metric], rel=1e-6) and now['loss'] == pytest.approx(then['loss'], rel=1e-5)
  assert now['sparsity'] == pytest.approx(then['sparsity'])


def test_a_0_3_lm_export_loads_to_the_same_logits():
  model, variables = export.load(os.path.join(LM, 'export', 'model.safetensors'))
  tokens = np.frombuffer(b'The function returns the default value of the object..', np.uint8)[:32].astype(np.int32)[None]
  then = np.load(os.path.join(LM, 'export', 'logits_tokens.npy'))
  np.testing.assert_allclose(np.asarray(model.apply(variables, tokens)), then, rtol=1e-5, atol=1e-5)
