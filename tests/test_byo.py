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
  # warm start: the TTQ run read the FP run's final parameters (the digest of what it loaded) ...
  import json
  import jax
  import numpy as np
  from flax import traverse_util
  from ttq_jax import checkpoint as ckpt
  from ttq_jax import workdirs
  ttq_rows = metrics_rows(tmp_path / 'ttq')
  record = json.loads((tmp_path / 'ttq' / 'init_from.json').read_text())
  fp = workdirs.restore(None, str(tmp_path / 'fp'), model=byo_model.Net())
  fp_params = jax.device_get(fp.state.params)
  assert record['step'] == fp.step and record['params_sha256'] == ckpt.params_sha256(fp_params)
  # ... and loading copies them: every FP tensor lands at its path in the quantized model's state
  ttq_state = workdirs.restore(None, str(tmp_path / 'ttq'), model=quant.quantize(byo_model.Net(), byo_model.RULES)).state
  loaded, again_record = ckpt.load_init_from(ttq_state, str(tmp_path / 'fp'))
  assert again_record['params_sha256'] == record['params_sha256']
  flat_loaded = traverse_util.flatten_dict(jax.device_get(loaded.params), sep='/')
  for path, value in traverse_util.flatten_dict(fp_params, sep='/').items():
    np.testing.assert_array_equal(flat_loaded[path], value, err_msg=path)
  assert any(not np.array_equal(flat_loaded[p], v) for p, v in
             traverse_util.flatten_dict(jax.device_get(ttq_state.params), sep='/').items() if p in flat_loaded)

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


@pytest.mark.slow
def test_byo_example_in_flax_nnx(tmp_path):
  """`byo_model.py --api nnx`: the same net in NNX warm-starts from its FP checkpoint, trains ternary, exports with
  per-channel scales, and the file scores what the checkpoint scores."""
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import json
  import byo_model
  from ttq_jax import checkpoint as ckpt
  from ttq_jax import workdirs

  out = byo_model.run(str(tmp_path), smoke=True, api='nnx')
  ttq, summary, from_file = out['ttq'], out['export'], out['from_file']
  assert sorted(ttq['sparsity']) == ['conv_0/kernel', 'conv_1/kernel']
  assert all(summary['layers'][f'params/conv_{i}/kernel']['per_channel'] for i in (0, 1))
  assert from_file['top1_accuracy'] == ttq['top1_accuracy']
  record = json.loads((tmp_path / 'ttq' / 'init_from.json').read_text())
  fp = workdirs.restore(None, str(tmp_path / 'fp'), model=byo_model.NNXNet())
  assert record['params_sha256'] == ckpt.params_sha256(fp.state.params)


@pytest.mark.slow
def test_own_model_without_train_argument_and_own_data_rules(tmp_path):
  """A model whose `__call__` has no `train` trains (train is passed only when accepted); uint8 images without
  mean / std are refused in one line; the workdir alone (and the model) exports, evaluating needs the data."""
  import jax.numpy as jnp
  import numpy as np
  from ttq_jax import evaluation, export, quant, train, workdirs
  from ttq_jax.errors import ConfigError
  from configs import fashion_mnist

  class NoTrain(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(10, name='head')(nn.Dense(16, name='hidden')(x.reshape(x.shape[0], -1)))

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (256, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, 256)
  config = fashion_mnist.get_config('smoke')
  config.mesh_shape, config.compilation_cache_dir, config.num_train_steps = (1, 1), '', 2
  config.data.limit_examples, config.bn_recalibration_batches = 0, 0
  with pytest.raises(ConfigError, match='the images are uint8 .* mean / std are not given'):
    train.train_and_evaluate(config, str(tmp_path / 'refused'), model=NoTrain(),
                             data={'train': (images, labels), 'test': (images, labels)})
  data = {'train': (images, labels), 'test': (images[:64], labels[:64]), 'mean': (127.5,), 'std': (73.9,)}
  model = quant.quantize(NoTrain(), [quant.Rule(module_path='hidden')])
  result = train.train_and_evaluate(config, str(tmp_path / 'run'), model=model, data=data)
  assert result['step'] == 2 and list(result['sparsity']) == ['hidden/kernel']
  assert result['layer_rules'] == {'hidden/kernel': {'method': 'ttq', 'threshold': 'max', 't': 0.05}}
  from ttq_jax import datasets
  assert datasets.USER_DATA_NAME not in datasets.DATASETS  # nothing registered in module state
  saved = workdirs.workdir_config(None, str(tmp_path / 'run')).data
  assert datasets.dataset_info(saved) == datasets.user_data(**data).info  # the facts travel in config.json
  # a workdir written before data.user_dataset existed kept the facts in WORKDIR/user_dataset.json
  import dataclasses
  import json
  saved_config = json.loads((tmp_path / 'run' / 'config.json').read_text())
  del saved_config['data']['user_dataset']
  (tmp_path / 'run' / 'config.json').write_text(json.dumps(saved_config))
  old_facts = {k: v for k, v in dataclasses.asdict(datasets.user_data(**data).info).items() if k != 'reader'}
  (tmp_path / 'run' / datasets.USER_DATA_INFO).write_text(json.dumps(old_facts))
  summary = export.export_workdir(None, str(tmp_path / 'run'), model=model)
  assert summary['step'] == 2 and summary['layers']['params/hidden/kernel']['numel'] == 784 * 16
  with pytest.raises(ConfigError, match=r"data.name='user' is your own data.*pass data="):
    evaluation.evaluate_workdir(None, str(tmp_path / 'run'), model=model)
  ev = evaluation.evaluate_workdir(None, str(tmp_path / 'run'), model=model, data=data)
  assert ev['top1_accuracy'] == pytest.approx(result['top1_accuracy'])
  del jnp
