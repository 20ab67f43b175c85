"""Training tests: end to end, exact resume, sharded == single device, optimizer maths, guards."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ttq_jax import checkpoint as ckpt
from ttq_jax import config_check
from ttq_jax import evaluation
from ttq_jax import input_pipeline
from ttq_jax import sharding as sharding_lib
from ttq_jax import train


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def _final_params(workdir, config):
  mesh = sharding_lib.create_mesh((1, 1), ('data', 'fsdp'))
  state = train.create_train_state(config, train.create_model(config), mesh)
  step, state, _ = ckpt.restore_latest(ckpt.create_manager(workdir, read_only=True), state)
  return step, jax.device_get(state)


@pytest.mark.slow
def test_train_and_evaluate_end_to_end(smoke_config, tmp_path):
  workdir = str(tmp_path / 'run')
  smoke_config.target_accuracy = 0.01  # any trained model beats 1%: the first eval reaches it
  result = train.train_and_evaluate(smoke_config, workdir)
  assert result['target']['step'] == 6 and 0 < result['target']['seconds'] <= result['elapsed_s']
  assert result['step'] == 6 and 0.0 <= result['top1_accuracy'] <= 1.0 and result['num_examples'] == 512
  assert np.isfinite(result['loss']) and len(result['sparsity']) == 6
  rows = _rows(workdir)
  assert [r['step'] for r in rows] == [2, 4, 6] and all('train_loss' in r for r in rows)
  assert rows[-1]['eval_top1_accuracy'] == pytest.approx(result['top1_accuracy'])
  assert rows[-1]['time_to_target_s'] == pytest.approx(result['target']['seconds'])
  assert 0 < rows[0]['elapsed_s'] < rows[-1]['elapsed_s'] and 'time_to_target_s' not in rows[0]
  assert 'w_p/PreActBlock_0/TernaryConv_0' in rows[0] and 'sparsity/mean' in rows[0]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['name'] == 'resnet_tiny'
  # --mode eval on the newest checkpoint reproduces the final evaluation and writes its JSON
  ev = evaluation.evaluate_workdir(smoke_config, workdir)
  saved = json.load(open(os.path.join(workdir, 'eval', 'step_6.json')))
  assert saved['top1_accuracy'] == pytest.approx(result['top1_accuracy'])
  assert saved['loss'] == pytest.approx(result['loss'], rel=1e-6)
  for key in ('step', 'loss', 'top1_accuracy', 'top5_accuracy', 'sparsity', 'w_p', 'w_n'):
    assert key in saved
  assert ev['w_p'] == {k: v[0] for k, v in result['scales'].items()}


@pytest.mark.slow
def test_resume_continues_at_the_right_step_exactly(smoke_config, tmp_path):
  full = str(tmp_path / 'full')
  train.train_and_evaluate(smoke_config, full)
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(full, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))  # as if killed between steps 3 and 6
  os.remove(os.path.join(resumed, 'metrics.jsonl'))
  result = train.train_and_evaluate(smoke_config, resumed)
  assert [r['step'] for r in _rows(resumed)] == [4, 6]  # continued from step 3
  assert result['step'] == 6
  (_, a), (_, b) = _final_params(full, smoke_config), _final_params(resumed, smoke_config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _state_and_batch(config, mesh_shape):
  mesh = sharding_lib.create_mesh(mesh_shape, ('data', 'fsdp'))
  state = train.create_train_state(config, train.create_model(config), mesh)
  programs = train.Programs(config, mesh, jax.tree.map(lambda x: x.sharding, state))
  ds = input_pipeline.train_dataset(config.data, local_batch_size=config.batch_size, seed=0)
  return programs, state, [sharding_lib.global_batch(ds[i], mesh) for i in range(3)]


@pytest.mark.parametrize('method', ['ttq', 'fp'])
def test_data_parallel_step_on_8_devices_matches_1_device(smoke_config, method):
  """Same global batch on 1, 8 and 4x2 devices: the first step's new params agree to float tolerance
  (BN statistics over the global batch, gradients all-reduced); later losses agree closely too (a latent
  weight within ~1e-7 of the threshold may flip on another reduction order, so only the loss is compared).
  TTQ's +-1 kernels make pre-BN activations ~10x larger than FP's, and the BN backward's mean
  subtractions then amplify reduction-order rounding to ~1e-3 relative; a sign or scale error is O(1)."""
  smoke_config.quant.method = method
  smoke_config.batch_size = 32
  results = []
  for mesh_shape in [(1, 1), (8, 1), (4, 2)]:
    programs, state, batches = _state_and_batch(smoke_config, mesh_shape)
    state, m = programs.train(state, batches[0])
    first = (float(m['train_loss']), jax.device_get(state.params), jax.device_get(state.batch_stats))
    losses = [first[0]]
    for b in batches[1:]:
      state, m = programs.train(state, b)
      losses.append(float(m['train_loss']))
    results.append((losses, first))
  rtol, atol = (1e-4, 1e-6) if method == 'fp' else (3e-3, 1e-4)
  (ref_losses, (_, ref_params, ref_stats)) = results[0]
  for losses, (_, params, stats) in results[1:]:
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    for x, y in zip(jax.tree.leaves((params, stats)), jax.tree.leaves((ref_params, ref_stats))):
      np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize('program', ['train', 'eval', 'moments'])
@pytest.mark.parametrize('method', ['ttq', 'fp'])
def test_cpu_fast_path_matches_xla_default(smoke_config, method, program):
  """The per-program XLA:CPU options (YNNPACK fusions off) change speed, not numbers: loss,
  updated params / BN statistics (train), eval sums and BN batch moments agree with XLA's default."""
  smoke_config.quant.method = method
  smoke_config.batch_size = 32
  outs, texts = [], []
  for option in ('off', 'on'):
    smoke_config.xla_cpu_ynn_fusion = option
    programs, state, batches = _state_and_batch(smoke_config, (1, 1))
    if program == 'train':
      state, m = programs.train(state, batches[0])
      outs.append((float(m['train_loss']), float(m['grad_norm']), jax.device_get(state.params),
                   jax.device_get(state.batch_stats)))
    elif program == 'eval':
      batch = dict(batches[0], mask=jnp.ones(32, jnp.float32))
      outs.append(jax.device_get(programs.eval(state, batch)))
    else:
      outs.append(jax.device_get(programs.moments(state, batches[0])))
    assert (train.compiler_options(smoke_config, program) is None) == (option == 'on')
    texts.append(programs._cache[(program, True)].as_text())
  assert texts[0] != texts[1]  # the option really produced another executable
  # Reduction order differs between the executables: float32 rounding of sums (~1e-5 of the values'
  # scale); TTQ's larger pre-BN activations amplify it (see the data-parallel test).
  rtol, atol = (1e-4, 1e-5) if method == 'fp' else (3e-3, 1e-4)
  for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_learning_rate_schedules(smoke_config):
  c = smoke_config
  c.num_train_steps = 100
  c.data.limit_examples = 640  # 10 steps per epoch
  c.lr_schedule = 'piecewise'
  c.learning_rate = 0.1
  c.lr_boundaries_epochs = (3.0, 6.0)
  c.lr_values = (0.01, 0.001)
  fn = train.create_learning_rate_fn(c)
  assert [float(fn(s)) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  scale_fn = train.create_learning_rate_fn(c, 1e-3)
  assert float(scale_fn(30)) == pytest.approx(1e-4)  # same shape, own base rate
  c.lr_schedule = 'cosine'
  c.warmup_epochs = 1.0
  fn = train.create_learning_rate_fn(c)
  assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(0.05) and float(fn(10)) == pytest.approx(0.1)
  assert float(fn(55)) == pytest.approx(0.05, abs=1e-3) and float(fn(100)) == pytest.approx(0.0, abs=1e-6)


def test_first_update_uses_sgd_for_weights_and_adam_for_scales(smoke_config):
  """Weights: -lr * (g + wd * w) (plain SGD, no momentum history yet); scales: Adam's first step
  is -scale_lr * sign(g); biases / BN are not decayed."""
  c = smoke_config
  c.nesterov = False
  c.lr_schedule = 'constant'
  c.learning_rate, c.weight_decay, c.scale_learning_rate = 0.05, 0.01, 0.002
  c.ternary_kernel_lr_multiplier = 1.0  # (its own test below)
  params = {'TernaryConv_0': {'kernel': jnp.array([1.0, -2.0]), 'w_p': jnp.float32(1.0), 'w_n': jnp.float32(1.0),
                              'bias': jnp.array([0.5])}}
  grads = {'TernaryConv_0': {'kernel': jnp.array([0.1, 0.2]), 'w_p': jnp.float32(3.0), 'w_n': jnp.float32(-0.5),
                             'bias': jnp.array([1.0])}}
  tx = train.create_optimizer(c, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  u = updates['TernaryConv_0']
  np.testing.assert_allclose(u['kernel'], [-0.05 * (0.1 + 0.01), -0.05 * (0.2 - 0.02)], rtol=1e-6)
  np.testing.assert_allclose(u['bias'], [-0.05], rtol=1e-6)
  assert float(u['w_p']) == pytest.approx(-0.002, rel=1e-4) and float(u['w_n']) == pytest.approx(0.002, rel=1e-4)
  c.decay_scales = True
  c.scale_optimizer = 'same'
  tx = train.create_optimizer(c, params)
  u = tx.update(grads, tx.init(params), params)[0]['TernaryConv_0']
  assert float(u['w_p']) == pytest.approx(-0.05 * (3.0 + 0.01))


@pytest.mark.parametrize('multiplier', [3.0, 0.5])
def test_ternary_kernel_lr_multiplier_scales_latent_kernel_updates_from_the_switch(smoke_config, multiplier):
  """Before the FP->ternary switch every update is unchanged; from the switch on the latent kernels of
  ternary layers (and only those) move `multiplier` times as far; 'fp' and 'twn' runs ignore it."""
  c = smoke_config
  c.lr_schedule, c.learning_rate, c.weight_decay = 'constant', 0.05, 1e-3
  c.fp_warmup_epochs = 0.25  # smoke: 512 examples / batch 64 = 8 steps per epoch -> switch at step 2
  params = {'TernaryConv_0': {'kernel': jnp.array([1.0, -2.0]), 'w_p': jnp.float32(1.0), 'w_n': jnp.float32(1.0)},
            'Conv_0': {'kernel': jnp.array([0.3])}, 'BatchNorm_0': {'scale': jnp.array([1.0])}}
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)

  def updates(m, method='ttq'):
    c.ternary_kernel_lr_multiplier, c.quant.method = m, method
    tx = train.create_optimizer(c, params)
    opt_state, out = tx.init(params), []
    for _ in range(4):
      u, opt_state = tx.update(grads, opt_state, params)
      out.append(u)
    return out

  base, scaled = updates(1.0), updates(multiplier)
  for step, (u1, um) in enumerate(zip(base, scaled)):
    factor = multiplier if step >= 2 else 1.0
    np.testing.assert_allclose(um['TernaryConv_0']['kernel'], factor * u1['TernaryConv_0']['kernel'], rtol=1e-6)
    for path in (('TernaryConv_0', 'w_p'), ('TernaryConv_0', 'w_n'), ('Conv_0', 'kernel'), ('BatchNorm_0', 'scale')):
      np.testing.assert_allclose(um[path[0]][path[1]], u1[path[0]][path[1]], rtol=1e-6)
  for method in ('fp', 'twn'):
    plain, ignored = updates(1.0, method), updates(multiplier, method)
    np.testing.assert_allclose(ignored[-1]['TernaryConv_0']['kernel'], plain[-1]['TernaryConv_0']['kernel'])


def test_batch_moments_are_the_batch_statistics():
  import flax.linen as nn
  class BNOnly(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      return nn.BatchNorm(use_running_average=not train, momentum=train_lib_momentum())(x)
  def train_lib_momentum():
    return train.BN_MOMENTUM
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 3)) * jnp.array([1.0, 2.0, 3.0]) + 5.0
  model = BNOnly()
  variables = model.init(jax.random.PRNGKey(1), x)
  state = train.TrainState.create(apply_fn=model.apply, params=variables['params'], tx=optax.sgd(0.1),
                                  batch_stats=variables['batch_stats'], rng=jax.random.PRNGKey(0))
  info = input_pipeline.DatasetInfo(2, (3,), 1, 1, (0.0,), (1.0,))
  stats = train.batch_moments_step(state, {'image': x}, apply_fn=model.apply, info=info, dtype=jnp.float32)
  np.testing.assert_allclose(stats['BatchNorm_0']['mean'], x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats['BatchNorm_0']['var'], x.var(0), rtol=1e-4)


def test_non_finite_step_is_skipped_and_reported(smoke_config):
  programs, state, batches = _state_and_batch(smoke_config, (1, 1))
  before = jax.device_get(state.params)
  bad = dict(batches[0], image=batches[0]['image'].astype(jnp.float32) * jnp.nan)
  fn = jax.jit(lambda s, b: train.train_step(s, b, apply_fn=programs.models[True].apply, info=programs.info,
                                              dtype=jnp.float32))
  new_state, metrics = fn(state, bad)
  assert not bool(metrics['finite'])
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new_state.params))):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(train.NonFiniteError, match='not finite at step 7'):
    train._flush_metrics([(7, metrics)], lambda s: 0.1)


def test_workdir_guard(smoke_config, tmp_path):
  wd = str(tmp_path)
  config_check.prepare_workdir(smoke_config, wd)
  smoke_config.learning_rate = 0.5
  smoke_config.num_train_steps = 99
  config_check.prepare_workdir(smoke_config, wd)  # schedule changes are fine
  smoke_config.model.name = 'resnet20'
  smoke_config.quant.method = 'twn'
  with pytest.raises(ValueError, match="model.name: 'resnet_tiny' -> 'resnet20', quant.method: 'ttq' -> 'twn'"):
    config_check.prepare_workdir(smoke_config, wd)
  smoke_config.allow_config_change = True
  config_check.prepare_workdir(smoke_config, wd)


def test_workdir_guard_on_the_ternary_kernel_lr_multiplier():
  """It changes a TTQ run's optimizer state, so a TTQ workdir refuses another value (a saved config
  from before the key existed counts as 1.0); FP / TWN runs do not use it, so it is not compared."""
  old = {'quant': {'method': 'ttq'}}  # written before the key existed
  assert config_check.changed_guarded_fields(old, {'quant': {'method': 'ttq'}, 'ternary_kernel_lr_multiplier': 1.0}) == []
  assert config_check.changed_guarded_fields(old, {'quant': {'method': 'ttq'}, 'ternary_kernel_lr_multiplier': 10.0}) == [
      'ternary_kernel_lr_multiplier']
  twn = {'quant': {'method': 'twn'}}
  assert config_check.changed_guarded_fields(twn, {'quant': {'method': 'twn'}, 'ternary_kernel_lr_multiplier': 10.0}) == []


@pytest.mark.slow
def test_init_from_full_precision_run(smoke_config, tmp_path):
  fp_dir = str(tmp_path / 'fp')
  fp = smoke_config.copy_and_resolve_references()
  fp.quant.method = 'fp'
  train.train_and_evaluate(fp, fp_dir)
  _, fp_state = _final_params(fp_dir, fp)
  smoke_config.init_from = fp_dir
  smoke_config.normalize_init = True
  mesh = sharding_lib.create_mesh((1, 1), ('data', 'fsdp'))
  state = train.create_train_state(smoke_config, train.create_model(smoke_config), mesh)
  state = jax.device_get(train.load_init_from(state, smoke_config, fp_dir))
  src = fp_state.params['PreActBlock_1']['TernaryConv_0']['kernel']
  dst = state.params['PreActBlock_1']['TernaryConv_0']
  np.testing.assert_allclose(dst['kernel'], src / np.abs(src).max(), rtol=1e-6)
  assert float(dst['w_p']) == 1.0 and float(dst['w_n']) == 1.0
  np.testing.assert_array_equal(state.params['Conv_0']['kernel'], fp_state.params['Conv_0']['kernel'])
  np.testing.assert_array_equal(state.batch_stats['BatchNorm_0']['mean'], fp_state.batch_stats['BatchNorm_0']['mean'])
