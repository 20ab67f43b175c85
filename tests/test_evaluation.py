"""Evaluation: BN moments are the batch statistics; eval sums and top-k by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttq_jax import datasets
from ttq_jax import evaluation
from ttq_jax import models
from ttq_jax import state as state_lib
from ttq_jax import tasks
from ttq_jax import workdirs


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
  info = datasets.DatasetInfo(2, (3,), 1, 1, (0.0,), (1.0,))
  stats = evaluation.batch_moments_step(state, {'image': x}, apply_fn=model.apply, info=info, dtype=jnp.float32)
  np.testing.assert_allclose(stats['BatchNorm_0']['mean'], x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats['BatchNorm_0']['var'], x.var(0), rtol=1e-4)


@pytest.mark.parametrize('k,expected', [(1, [1.0, 0.0, 0.0]), (2, [1.0, 1.0, 0.0]), (3, [1.0, 1.0, 1.0])])
def test_topk_correct(k, expected):
  logits = jnp.array([[0.1, 0.9, 0.0], [0.5, 0.3, 0.2], [0.2, 0.3, 0.1]])
  labels = jnp.array([1, 1, 2])  # ranks 1, 2, 3
  np.testing.assert_array_equal(tasks.topk_correct(logits, labels, k), expected)


def test_eval_step_sums_over_valid_rows_only():
  class Fixed(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return jnp.stack([x[:, 0], -x[:, 0]] + [jnp.zeros_like(x[:, 0])] * 5, axis=-1)  # 7 classes
  model = Fixed()
  state = state_lib.TrainState.create(apply_fn=model.apply, params={}, tx=optax.identity(), batch_stats={})
  info = datasets.DatasetInfo(7, (1,), 1, 1, (0.0,), (1.0,))
  batch = {'image': jnp.array([[2.0], [-3.0], [1.0]]), 'label': jnp.array([0, 0, 1]),
           'mask': jnp.array([1.0, 1.0, 0.0])}
  out = evaluation.eval_step(state, batch, apply_fn=model.apply, info=info, dtype=jnp.float32)
  logits = jnp.array([[2.0, -2.0] + [0.0] * 5, [-3.0, 3.0] + [0.0] * 5])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 0]))
  assert float(out['count']) == 2.0 and float(out['top1_correct']) == 1.0
  assert float(out['loss']) == pytest.approx(float(loss.sum()), rel=1e-6)
  assert float(out['top5_correct']) == 1.0  # the second row's label ranks 7th of 7


@pytest.mark.slow
def test_the_workdirs_config_decides_eval_and_export(smoke_config, tmp_path, caplog):
  """Trained with a warm-up shortened by an override; evaluated with the config file's value (as the README's
  commands do): the saved config decides, the headline is training's, a warning names the field; export works."""
  import json
  import os
  from ttq_jax import config_check, export, train
  workdir = str(tmp_path / 'run')
  c = smoke_config.copy_and_resolve_references()
  c.fp_warmup_steps = 4  # ternary from step 5 of 6
  c.quant.t = 0.1  # a nested key, trained with
  result = train.train_and_evaluate(c, workdir)
  assert result['ternary_steps'] == 2 and result['param_counts']['ternary'] > 0
  smoke_config.fp_warmup_steps = 100  # "the config file": would make step 6 a warm-up checkpoint
  smoke_config.quant.t = 0.3  # and a threshold that would zero other weights
  smoke_config.eval_batch_size = 128  # may change
  with caplog.at_level('WARNING'):
    ev = evaluation.evaluate_workdir(smoke_config, workdir)
  assert 'fp_warmup_steps (saved 4, given 100)' in caplog.text and 'eval_batch_size (saved' not in caplog.text
  assert 'quant.t (saved 0.1, given 0.3)' in caplog.text
  assert ev['top1_accuracy'] == pytest.approx(result['top1_accuracy']) and ev['sparsity'] == pytest.approx(result['sparsity'])
  assert evaluation.evaluate_workdir(None, workdir)['top1_accuracy'] == pytest.approx(result['top1_accuracy'])
  restored = workdirs.restore(smoke_config, workdir)
  assert {layer.quant.t for layer in restored.state.ternary} == {0.1}  # the saved nested value, not the given one
  exported = export.export_workdir(smoke_config, workdir)
  assert exported['step'] == 6  # not refused as a warm-up checkpoint
  assert {k.removeprefix('params/'): r['sparsity'] for k, r in exported['layers'].items()} == pytest.approx(result['sparsity'])
  assert json.load(open(os.path.join(workdir, 'config.json')))['fp_warmup_steps'] == 4  # nothing rewritten
  # explicit overrides: only what may change
  workdirs.check_overrides(workdir, ['eval_batch_size', 'data.data_dir'])
  with pytest.raises(config_check.ConfigError, match=r'--config.quant.t cannot be changed when evaluating'):
    workdirs.check_overrides(workdir, ['eval_batch_size', 'quant.t'])
  import subprocess
  import sys
  from tests.conftest import ROOT
  p = subprocess.run([sys.executable, '-m', 'ttq_jax.main', '--config', 'configs/fashion_mnist.py', '--workdir', workdir,
                      '--mode', 'eval', '--config.quant.t=0.2'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  errors = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert p.returncode == 2 and len(errors) == 1 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  assert '--config.quant.t cannot be changed' in errors[0]


@pytest.mark.slow
def test_a_run_that_ends_inside_its_warm_up_says_so(smoke_config, tmp_path, caplog):
  from ttq_jax import train
  smoke_config.fp_warmup_steps = 10  # > the 6 steps
  with caplog.at_level('WARNING'):
    result = train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))
  assert 'inside its full-precision warm-up' in caplog.text
  assert result['ternary_steps'] == 0 and result['param_counts']['ternary'] == 0 and result['sparsity'] == {}


def test_explicit_overrides_are_read_from_the_command_line():
  from ttq_jax import main
  argv = ['main', '--config', 'c.py', '--config.quant.t=0.2', '--config.eval_batch_size', '64', '--workdir=w']
  assert main.explicit_overrides(argv) == ['quant.t', 'eval_batch_size']
