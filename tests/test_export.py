"""`--mode export` and `export.load`: the job around the file format (tests/test_export_format.py)."""

import json
import os

import jax
import numpy as np
import pytest

from tests.test_export_format import ttq_variables, write_export
from ttq_jax import evaluation
from ttq_jax import export
from ttq_jax import export_format
from ttq_jax import train
from ttq_jax.errors import ExportError


@pytest.mark.parametrize('packing', ['2bit', 'base3'])
def test_export_load_gives_the_same_logits(tmp_path, packing):
  model, variables = ttq_variables()
  path = write_export(tmp_path, packing, variables)
  loaded_model, loaded = export.load(path)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))
  np.testing.assert_array_equal(loaded_model.apply(loaded, x, train=False), model.apply(variables, x, train=False))
  _, metadata, report = export_format.read(path)
  assert metadata['format'] == 'ttq-safetensors-v2' and metadata['packing'] == packing
  assert set(report) == {f'params/{k}' for k in ('res1_0/conv1/kernel',
                                                 'res1_0/conv2/kernel',
                                                 'res2_0/conv1/kernel',
                                                 'res2_0/conv2/kernel',
                                                 'res3_0/conv1/kernel',
                                                 'res3_0/conv2/kernel')}


@pytest.mark.slow
@pytest.mark.parametrize('packing,dtype', [('2bit', 'float32'), ('base3', 'float32'), ('2bit', 'bfloat16')])
def test_mode_export_then_eval_of_the_file_equals_the_checkpoint(smoke_config, tmp_path, packing, dtype, capsys):
  """bfloat16 too: the codes are decided on the float32 latent kernels in the forward pass as in the export,
  so the file evaluates exactly as the checkpoint."""
  smoke_config.dtype = dtype
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config, workdir)
  from_ckpt = evaluation.evaluate_workdir(smoke_config, workdir)
  smoke_config.export.packing = packing
  summary = export.export_workdir(smoke_config, workdir)
  printed = capsys.readouterr().out
  assert 'x smaller' in printed and 'res3_0/conv2' in printed
  assert summary['ternary_compression'] > 10  # tiny layers: the shape/scale overhead shows
  smoke_config.restore_from = summary['path']
  from_file = evaluation.evaluate_workdir(smoke_config, workdir)
  # one number for one model: the export carries the headline's (re-estimated) BN statistics, so the file scores
  # exactly the checkpoint's headline: the same count of correct test examples
  assert from_ckpt['bn_statistics'] == from_file['bn_statistics'] == 'reestimated'
  assert export_format.read(summary['path'])[1]['bn_statistics'] == 'reestimated'
  n = from_ckpt['num_examples']
  assert round(from_file['top1_accuracy'] * n) == round(from_ckpt['top1_accuracy'] * n)
  assert from_file['loss'] == pytest.approx(from_ckpt['loss'], rel=1e-5)
  assert from_file['sparsity'] == pytest.approx(from_ckpt['sparsity'])
  assert os.path.exists(os.path.join(workdir, 'eval', 'export_step_6.json'))
  if packing == '2bit' and dtype == 'float32':  # the documented way to use the file: raw uint8 test images in
    from ttq_jax import datasets
    spec = json.loads(export_format.read(summary['path'])[1]['input'])
    assert spec['mean'] == [72.94] and spec['input_shape'] == [28, 28, 1] and spec['task'] == 'classify'
    images, labels = datasets.load_fashion_mnist('test')
    logits = export.predictor(summary['path'])(images[:n])
    assert round(float(np.mean(np.argmax(np.asarray(logits), -1) == labels[:n])) * n) == round(from_file['top1_accuracy'] * n)
  if packing == '2bit' and dtype == 'float32':  # training's running statistics, on request
    smoke_config.restore_from, smoke_config.export.bn_statistics = '', 'running'
    export.export_workdir(smoke_config, workdir)
    smoke_config.restore_from = summary['path']
    running = evaluation.evaluate_workdir(smoke_config, workdir)
    assert running['bn_statistics'] == 'running'
    assert running['top1_accuracy'] == from_ckpt['test']['running']['top1_accuracy']
    # re-estimation needs the training data: without it, one line naming the way out; the file is untouched
    smoke_config.restore_from, smoke_config.export.bn_statistics = '', 'reestimated'
    smoke_config.data.data_dir = str(tmp_path / 'empty')
    before = open(summary['path'], 'rb').read()
    with pytest.raises(ExportError, match=r"not available here .*--config.export.bn_statistics=running"):
      export.export_workdir(smoke_config, workdir)
    assert open(summary['path'], 'rb').read() == before


@pytest.mark.slow
def test_export_of_a_warmup_checkpoint_is_refused(smoke_config, tmp_path):
  """A checkpoint from the full-precision warm-up has never-trained ternary codes: exporting it is refused
  in one line naming the step where ternary training starts; a later checkpoint exports."""
  smoke_config.fp_warmup_epochs = 0.5  # 8 steps per epoch: steps 1-4 full precision, checkpoints at 3 and 6
  workdir = str(tmp_path)
  train.train_and_evaluate(smoke_config, workdir)
  smoke_config.eval_step = 3
  with pytest.raises(ExportError, match='checkpoint step 3 is from the full-precision warm-up .ternary training '
                                        'starts after step 4') as e:
    export.export_workdir(smoke_config, workdir)
  assert '\n' not in str(e.value) and not os.path.exists(os.path.join(workdir, 'export'))
  assert evaluation.evaluate_workdir(smoke_config, workdir)['sparsity'] == {}  # evaluated as the FP model it is
  smoke_config.eval_step = 6
  assert export.export_workdir(smoke_config, workdir)['step'] == 6


@pytest.mark.slow
def test_a_vit_ternary_by_rules_trains_exports_and_reloads(tmp_path):
  """The ViT is plain Flax; its attention and MLP projections are ternary by rule. Its checkpoint exports
  (DenseGeneral kernels with several axes included), and the export evaluates as the checkpoint does."""
  from configs import vit_fashion_mnist
  config = vit_fashion_mnist.get_config('smoke')
  config.mesh_shape, config.compilation_cache_dir = (1, 1), ''
  workdir = str(tmp_path)
  result = train.train_and_evaluate(config, workdir)
  assert sorted(p.rsplit('/', 1)[0] for p in result['sparsity']) == [
      'block_0/attn/key', 'block_0/attn/out', 'block_0/attn/query', 'block_0/attn/value', 'block_0/mlp_in',
      'block_0/mlp_out']
  from_ckpt = evaluation.evaluate_workdir(config, workdir)
  summary = export.export_workdir(config, workdir)
  assert summary['layers']['params/block_0/attn/query/kernel']['numel'] == 16 * 2 * 8
  config.restore_from = summary['path']
  from_file = evaluation.evaluate_workdir(config, workdir)
  # an export carries the checkpoint's (running) BN statistics: it evaluates as the checkpoint's running column
  assert from_file['loss'] == pytest.approx(from_ckpt['test']['running']['loss'], rel=1e-6)
  assert from_file['top1_accuracy'] == from_ckpt['test']['running']['top1_accuracy']
