"""Training tests: end to end, exact resume, sharded == single device, the loop's helpers."""

import json
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import metrics_rows, restored, scaled_allclose
from ttq_jax import evaluation
from ttq_jax import input_pipeline
from ttq_jax import loop
from ttq_jax import sharding as sharding_lib
from ttq_jax import state as state_lib
from ttq_jax import train
from ttq_jax.errors import NonFiniteError


def programs_state_batches(config, mesh_shape, n=3):
  """(programs, fresh state, the first n global training batches) on a mesh of `mesh_shape`."""
  mesh, state = state_lib.create_mesh_and_state(config, mesh_shape=mesh_shape)
  programs = train.create_programs(config, mesh, state)
  ds = input_pipeline.train_dataset(config.data, local_batch_size=config.batch_size, seed=0)
  return programs, state, [sharding_lib.global_batch(ds[i], mesh) for i in range(n)]


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """(workdir, result, config) of one smoke training run that the end-to-end tests below read."""
  from tests.conftest import make_smoke_config
  config = make_smoke_config()
  config.target_accuracy = 0.01  # any trained model beats 1%: the first eval reaches it
  workdir = str(tmp_path_factory.mktemp('smoke_run') / 'run')
  return workdir, train.train_and_evaluate(config, workdir), config


@pytest.mark.slow
def test_end_to_end_result(smoke_run):
  _, result, _ = smoke_run
  assert result['step'] == 6 and result['ternary_steps'] == 6 and result['num_examples'] == 512
  assert 0.0 <= result['top1_accuracy'] <= 1.0 and np.isfinite(result['loss']) and len(result['sparsity']) == 6
  assert result['target']['step'] == 6 and 0 < result['target']['seconds'] <= result['elapsed_s']


@pytest.mark.slow
def test_end_to_end_metrics_rows(smoke_run):
  workdir, result, _ = smoke_run
  rows = metrics_rows(workdir)
  assert [r['step'] for r in rows] == [2, 4, 6] and all('train_loss' in r for r in rows)
  assert rows[-1]['time_to_target_s'] == pytest.approx(result['target']['seconds'])
  assert 0 < rows[0]['elapsed_s'] < rows[-1]['elapsed_s'] and 'time_to_target_s' not in rows[0]
  assert 'w_p/res1_0/conv1' in rows[0] and 'sparsity/mean' in rows[0]


@pytest.mark.slow
def test_end_to_end_both_bn_columns(smoke_run):
  """The running statistics of training and re-estimated ones (the headline, when computed)."""
  workdir, result, _ = smoke_run
  rows = metrics_rows(workdir)
  assert result['bn_statistics'] == 'reestimated' and set(result['test']) == {'running', 'reestimated'}
  assert rows[-1]['eval_bnre_top1_accuracy'] == pytest.approx(result['top1_accuracy'])
  assert rows[-1]['eval_top1_accuracy'] == pytest.approx(result['test']['running']['top1_accuracy'])
  assert result['protocol']['running']['final'] == rows[-1]['eval_top1_accuracy']


@pytest.mark.slow
def test_end_to_end_workdir_files(smoke_run):
  workdir, _, _ = smoke_run
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['name'] == 'resnet_tiny'


@pytest.mark.slow
def test_end_to_end_mode_eval_reproduces_the_final_evaluation(smoke_run):
  """--mode eval on the newest checkpoint reproduces the final evaluation and writes its JSON; the
  checkpoint keeps training's running statistics (re-estimated ones never leak into it)."""
  workdir, result, config = smoke_run
  ev = evaluation.evaluate_workdir(config, workdir)
  saved = json.load(open(os.path.join(workdir, 'eval', 'step_6.json')))
  assert saved['top1_accuracy'] == pytest.approx(result['top1_accuracy'])
  assert saved['loss'] == pytest.approx(result['loss'], rel=1e-6)
  assert saved['test']['running']['top1_accuracy'] == pytest.approx(result['test']['running']['top1_accuracy'])
  assert saved['test']['running'] != saved['test']['reestimated']
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
  assert [r['step'] for r in metrics_rows(resumed)] == [4, 6]  # continued from step 3
  assert result['step'] == 6
  (_, a), (_, b) = restored(full, smoke_config), restored(resumed, smoke_config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# Tolerances of the sharded-vs-single comparison, as a fraction of the largest entry of the compared tree
# (float32 sums are rounded relative to the magnitudes they add up; see conftest.scaled_allclose).
# Measured on a 2-core Xeon, first step of resnet_tiny on Fashion-MNIST, 8 devices vs 1: FP updates 1.9e-2
# (res1_0/bn2/scale), TTQ 4.5e-3. This is rounding, amplified, not sharding: on ONE device, permuting the rows
# of the same batch moves the FP update by 3e-3, while the model's float32 gradients alone move by 4e-6 (the
# first SGD step divides by BN variances of near-constant background channels). Losses of steps 1-2 agree to
# 4e-6 relative. A dropped gradient all-reduce (the update from half the batch) is off by 0.83 (FP) / 1.02
# (TTQ): asserted below.
UPDATE_TOL = {'fp': 5e-2, 'ttq': 2e-2}
STATS_TOL = 1e-3


@pytest.mark.parametrize('method', ['ttq', 'fp'])
def test_data_parallel_step_on_8_devices_matches_1_device(smoke_config, method):
  """Same global batch on 1, 8 and 4x2 devices: the first step's parameter update and BN statistics agree
  (BN statistics over the global batch, gradients all-reduced), and so do the losses of the first two steps.
  Later steps are not compared: a latent weight within rounding of the threshold may flip on another
  reduction order, and training amplifies that (measured: 1e-7 at steps 1-2, 4e-3 by step 5 at lr 0.1)."""
  smoke_config.quant.method = method
  smoke_config.batch_size = 32
  results = []
  for mesh_shape in [(1, 1), (8, 1), (4, 2)]:
    programs, state, batches = programs_state_batches(smoke_config, mesh_shape, n=2)
    before = jax.device_get(state.params)
    state, m1 = programs.train(state, batches[0])
    update = jax.tree.map(np.subtract, jax.device_get(state.params), before)
    stats = jax.device_get(state.batch_stats)
    state, m2 = programs.train(state, batches[1])
    results.append(([float(m1['train_loss']), float(m2['train_loss'])], update, stats))
  (ref_losses, ref_update, ref_stats), tol = results[0], UPDATE_TOL[method]
  for losses, update, stats in results[1:]:
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    scaled_allclose(update, ref_update, tol, 'update')
    scaled_allclose(stats, ref_stats, STATS_TOL, 'batch_stats')
  # The tolerance still sees a real error: the update of half the batch (a missing all-reduce over 2 devices).
  half = smoke_config.copy_and_resolve_references()
  half.batch_size = 16
  programs, state, _ = programs_state_batches(half, (1, 1), n=0)
  before = jax.device_get(state.params)
  rows = {k: np.asarray(v)[:16] for k, v in jax.device_get(batches[0]).items()}
  state, _ = programs.train(state, sharding_lib.global_batch(rows, programs.mesh))
  with pytest.raises(AssertionError):
    scaled_allclose(jax.tree.map(np.subtract, jax.device_get(state.params), before), ref_update, tol)


def test_non_finite_step_is_skipped_and_reported(smoke_config):
  programs, state, batches = programs_state_batches(smoke_config, (1, 1), n=1)
  before = jax.device_get(state.params)
  bad = dict(batches[0], image=batches[0]['image'].astype(jnp.float32) * jnp.nan)
  fn = jax.jit(lambda s, b: train.train_step(s, b, apply_fn=state_lib.apply_fn(programs.models[True]), info=programs.info,
                                              dtype=jnp.float32))
  new_state, metrics = fn(state, bad)
  assert not bool(metrics['finite'])
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new_state.params))):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(NonFiniteError, match='not finite at step 7'):
    loop.summarize_pending([(7, metrics)], lambda s: 0.1)


def test_summarize_pending_averages_and_reads_the_rate_of_the_last_step():
  pending = [(s, {'train_loss': jnp.float32(l), 'grad_norm': jnp.float32(1.0), 'finite': jnp.bool_(True)})
             for s, l in ((4, 1.0), (5, 2.0), (6, 4.5))]
  row = loop.summarize_pending(pending, lambda step: 0.01 * step)
  assert row == {'train_loss': 2.5, 'grad_norm': 1.0, 'learning_rate': pytest.approx(0.05)}  # lr of step index 5


@pytest.mark.parametrize('step,every,due', [(10, 5, True), (11, 5, False), (10, 0, False), (0, 3, True)])
def test_is_due(step, every, due):
  assert loop.is_due(step, every) is due


def test_stop_signal_records_and_restores_handlers():
  previous = signal.getsignal(signal.SIGTERM)
  with loop.StopSignal() as stop:
    assert stop.signum is None
    os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
    deadline = time.time() + 5
    while stop.signum is None and time.time() < deadline:  # Python runs handlers between bytecodes
      time.sleep(0.01)
    assert stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.slow
def test_validation_split_chooses_and_test_is_read_once_at_the_end(smoke_config, tmp_path):
  """With a held-out validation split, periodic evaluations read validation only; the best ternary
  evaluation per BN column is chosen there and its model evaluated on test at the end, next to the final
  model's test numbers. Warm-up evaluations count for neither "best" nor the protocol."""
  c = smoke_config
  c.data.validation_examples = 128
  c.eval_every_steps, c.fp_warmup_epochs, c.steps_per_epoch = 2, 1.0, 2  # FP steps 1-2, ternary 3-6
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(c, workdir)
  rows = [r for r in metrics_rows(workdir) if 'eval_top1_accuracy' in r]
  assert [r['step'] for r in rows] == [2, 4, 6] and [r['eval_ternary'] for r in rows] == [0.0, 1.0, 1.0]
  assert all(r['eval_num_examples'] == 128 for r in rows)             # validation, not test
  assert result['selection_split'] == 'validation' and result['num_examples'] == 512  # the test split
  for column, prefix in (('running', 'eval_'), ('reestimated', 'eval_bnre_')):
    ternary = [(r[prefix + 'top1_accuracy'], -r['step']) for r in rows[1:]]
    best_acc, neg_step = max(ternary)
    chosen = result['best_on_validation'][column]
    assert chosen['validation_top1_accuracy'] == best_acc and chosen['num_examples'] == 512
    assert result['protocol'][column]['num_evals'] == 2 and result['protocol'][column]['best'] == best_acc
  assert result['test']['reestimated']['top1_accuracy'] == result['top1_accuracy']
  saved = json.load(open(os.path.join(workdir, 'result.json')))
  assert saved['best_on_validation'] == result['best_on_validation']


@pytest.mark.slow
def test_sample_mode_is_refused_for_a_classifier_in_one_line(smoke_run):
  from ttq_jax import sampling
  from ttq_jax.errors import ConfigError
  workdir, _, _ = smoke_run
  with pytest.raises(ConfigError, match=r'--mode sample continues text with a language model; this model is scored by '
                                        r'top-1') as e:
    sampling.sample_workdir(None, workdir)
  assert '\n' not in str(e.value)


@pytest.mark.slow
def test_eval_writes_to_eval_dir_or_stdout_when_it_cannot(smoke_run, tmp_path, capsys, caplog):
  """`eval_dir` (overridable) takes the result file; where it cannot be written (a read-only shared workdir), the
  result goes to stdout with one warning and evaluation still works."""
  import json
  workdir, result, config = smoke_run
  given = config.copy_and_resolve_references()
  given.eval_dir = str(tmp_path / 'mine')
  ev = evaluation.evaluate_workdir(given, workdir)
  assert json.loads((tmp_path / 'mine' / 'step_6.json').read_text())['top1_accuracy'] == ev['top1_accuracy']
  given.eval_dir = '/proc/self/not_writable'
  capsys.readouterr()
  with caplog.at_level('WARNING'):
    again = evaluation.evaluate_workdir(given, workdir)
  out = capsys.readouterr().out
  assert 'is not writable' in caplog.text and json.loads(out.strip().splitlines()[-1])['top1_accuracy'] == again['top1_accuracy']


@pytest.mark.slow
def test_tensorboard_holds_the_final_test_metrics_hyperparameters_and_config(smoke_run):
  """Read back with TensorBoard's own reader: `test/*` scalars at the final step, the config as text and the
  hyperparameters with the final metrics (HParams plugin), beside the training scalars."""
  from tensorboard.backend.event_processing import event_accumulator
  workdir, result, _ = smoke_run
  events = event_accumulator.EventAccumulator(workdir, size_guidance={'scalars': 0, 'tensors': 0})
  events.Reload()
  final = events.Scalars('test/top1_accuracy')
  assert [e.step for e in final] == [6] and final[0].value == pytest.approx(result['top1_accuracy'])
  assert 'train_loss' in events.Tags()['scalars']
  config_text = events.Tensors('config/text_summary')[0].tensor_proto.string_val[0].decode()
  assert 'model.name = resnet_tiny' in config_text and 'quant.method = ttq' in config_text
  from tensorboard.plugins.hparams import plugin_data_pb2
  hparams = event_accumulator.EventAccumulator(f'{workdir}/hparams')
  hparams.Reload()
  start = plugin_data_pb2.HParamsPluginData.FromString(
      hparams.PluginTagToContent('hparams')['_hparams_/session_start_info']).session_start_info
  assert start.hparams['quant.method'].string_value == 'ttq' and start.hparams['model.name'].string_value == 'resnet_tiny'
  assert start.hparams['batch_size'].number_value == 64
