"""Train state: the switch to ternary by hand, the warm start (init_from) end to end, the restore helper."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import metrics_rows, restored
from tests.test_train import programs_state_batches
from ttq_jax import checkpoint as ckpt
from ttq_jax import state as state_lib
from ttq_jax import workdirs
from ttq_jax import train
from ttq_jax.errors import CheckpointError
from ttq_jax.quant import QuantConfig, TernaryLayer

PARAMS = {'TernaryConv_0': {'kernel': jnp.array([1.0, -0.4, 0.02, -2.0]), 'w_p': jnp.float32(0.3),
                            'w_n': jnp.float32(0.7)},
          'Conv_0': {'kernel': jnp.array([5.0, -5.0])}}


@pytest.mark.parametrize('scale_init,normalize,kernel,w_p,w_n', [
    # delta = 0.05 * max|w| = 0.1: positive set {1.0}, negative set {-0.4, -2.0}
    ('constant', False, [1.0, -0.4, 0.02, -2.0], 1.0, 1.0),
    ('mean_abs', False, [1.0, -0.4, 0.02, -2.0], 1.0, 1.2),
    ('constant', True, [0.5, -0.2, 0.01, -1.0], 1.0, 1.0),
    ('mean_abs', True, [0.5, -0.2, 0.01, -1.0], 0.5, 0.6),  # the same sets on the normalised kernel
])
def test_start_ternary_by_hand(smoke_config, scale_init, normalize, kernel, w_p, w_n):
  smoke_config.quant.scale_init, smoke_config.normalize_init = scale_init, normalize
  out = state_lib.start_ternary(PARAMS, smoke_config, (TernaryLayer('TernaryConv_0', QuantConfig()),))
  np.testing.assert_allclose(out['TernaryConv_0']['kernel'], kernel, rtol=1e-6)
  assert float(out['TernaryConv_0']['w_p']) == pytest.approx(w_p) and float(out['TernaryConv_0']['w_n']) == pytest.approx(w_n)
  np.testing.assert_array_equal(out['Conv_0']['kernel'], PARAMS['Conv_0']['kernel'])  # full precision: untouched
  assert float(PARAMS['TernaryConv_0']['w_p']) == pytest.approx(0.3)  # the input is not modified


@pytest.mark.parametrize('granularity,scale_shape,alpha', [
    ('channel', (1, 3), [2.0, 0.5, 0.3]),   # max |w| of each output column
    ('tensor', (), 2.0),                     # max |w| of the kernel
])
def test_start_ternary_sets_paretoq_alpha_from_the_kernel(smoke_config, granularity, scale_shape, alpha):
  """At the switch (and after init_from), ParetoQ's alpha restarts at max |w| over its reduced axes, whatever it
  held; None is the method's own scale init, TTQ's scales are not touched."""
  smoke_config.quant.scale_init = None
  kernel = jnp.array([[1.0, -0.5, 0.3], [-2.0, 0.25, -0.1]])
  params = {'p': {'kernel': kernel, 'alpha': jnp.full(np.prod(scale_shape, dtype=int), 7.0).reshape(-1 if scale_shape else ())},
            **PARAMS}
  layers = (TernaryLayer('p', QuantConfig(method='paretoq', scale_granularity=granularity), scale_shape),
            TernaryLayer('TernaryConv_0', QuantConfig()))
  out = state_lib.start_ternary(params, smoke_config, layers)
  np.testing.assert_array_equal(out['p']['alpha'], np.float32(alpha))
  assert out['p']['alpha'].shape == params['p']['alpha'].shape
  assert float(out['TernaryConv_0']['w_p']) == 1.0 and float(out['TernaryConv_0']['w_n']) == 1.0  # ttq's own: constant


def test_restore_of_an_empty_workdir_is_a_checkpoint_error(smoke_config, tmp_path):
  with pytest.raises(CheckpointError, match='has no checkpoints'):
    workdirs.restore(smoke_config, str(tmp_path))


@pytest.mark.slow
def test_init_from_full_precision_run(smoke_config, tmp_path):
  """A TTQ run with init_from starts from the FP run's weights and BN statistics, switched to ternary
  (scales by `quant.scale_init`) before its first step: its first logged loss is that model's loss."""
  fp_dir = str(tmp_path / 'fp')
  fp = smoke_config.copy_and_resolve_references()
  fp.quant.method = 'fp'
  train.train_and_evaluate(fp, fp_dir)
  _, fp_state = restored(fp_dir, fp)
  c = smoke_config
  c.init_from, c.normalize_init, c.quant.scale_init = fp_dir, True, 'mean_abs'
  # the pieces: copied weights and statistics, then the switch
  _, state, _ = programs_state_batches(c, (1, 1), n=0)
  state, record = ckpt.load_init_from(state, fp_dir)
  state = jax.device_get(state)
  # the record names what was loaded: the FP run's newest step and the digest of its params
  assert record == {'path': fp_dir, 'step': 6, 'params_sha256': ckpt.params_sha256(fp_state.params)}
  src = fp_state.params['res2_0']['conv1']['kernel']
  np.testing.assert_array_equal(state.params['res2_0']['conv1']['kernel'], src)
  np.testing.assert_array_equal(state.params['conv0']['kernel'], fp_state.params['conv0']['kernel'])
  np.testing.assert_array_equal(state.batch_stats['bn0']['mean'], fp_state.batch_stats['bn0']['mean'])
  switched = state_lib.start_ternary(state.params, c, state.ternary)
  np.testing.assert_allclose(switched['res2_0']['conv1']['kernel'], src / np.abs(src).max(), rtol=1e-6)
  assert 0.0 < float(switched['res2_0']['conv1']['w_p']) < 1.0  # mean |w| of a [-1, 1] kernel
  # the run: step 1's loss is the switched model's loss on batch 0 (and not the unswitched one's)
  programs, fresh, batches = programs_state_batches(c, (1, 1), n=1)
  loaded = ckpt.load_init_from(fresh, fp_dir)[0]
  switched = jax.device_put(state_lib.start_ternary(loaded.params, c, loaded.ternary),
                            state_lib.shardings_of(loaded.params))
  expected = programs.train(loaded.replace(params=switched), batches[0])[1]
  programs, fresh, _ = programs_state_batches(c, (1, 1), n=0)  # (programs are compiled for their state's tx)
  unswitched = programs.train(ckpt.load_init_from(fresh, fp_dir)[0], batches[0])[1]
  c.num_train_steps, c.log_every_steps = 2, 1
  train.train_and_evaluate(c, str(tmp_path / 'ttq'))
  first = metrics_rows(str(tmp_path / 'ttq'))[0]
  assert first['step'] == 1 and first['train_loss'] == pytest.approx(float(expected['train_loss']), rel=1e-6)
  assert first['train_loss'] != pytest.approx(float(unswitched['train_loss']), rel=1e-3)
  result = json.load(open(tmp_path / 'ttq' / 'result.json'))
  assert result['init_from'] == record  # kept in result.json (also after a resume: WORKDIR/init_from.json)


def test_checkpoints_written_with_the_unused_rng_still_restore(smoke_config, tmp_path):
  """Before 0.2 the state also held an rng key nothing read: such checkpoints restore, the key dropped."""
  class OldTrainState(state_lib.TrainState):  # the state class as it was
    rng: jax.Array = None

  _, state = state_lib.create_mesh_and_state(smoke_config)
  fields = {f: getattr(state, f) for f in state_lib.TrainState.__dataclass_fields__}
  manager = ckpt.create_manager(str(tmp_path))
  ckpt.save(manager, 5, OldTrainState(**fields, rng=jax.random.PRNGKey(3)), {'next_index': 5}, force=True)
  manager.wait_until_finished()
  manager.close()
  step, got = restored(tmp_path, smoke_config)
  assert step == 5 and not hasattr(got, 'rng')
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(state))):
    np.testing.assert_array_equal(x, y)


def test_an_explicitly_named_ternary_layer_gets_every_treatment(smoke_config):
  """Found in the module tree, not by name: a Conv named 'features' and a Dense named 'proj', each selected by
  its own rule, get the latent-kernel multiplier, the scale init at the switch, reports and packed export."""
  import flax.linen as nn
  from ttq_jax import export_format, quant, reports

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(4, (3, 3), name='features')(x)
      return nn.Dense(10, name='proj')(x.mean(axis=(1, 2)))

  c = smoke_config
  c.ternary_kernel_lr_multiplier, c.quant.scale_init, c.lr_schedule = 3.0, 'mean_abs', 'constant'
  model = quant.quantize(Net(), [quant.Rule(module_path='features'), quant.Rule(module_path='proj')])
  _, state = state_lib.create_mesh_and_state(c, model)
  assert [l.path for l in state.ternary] == ['features', 'proj']
  grads = jax.tree.map(jnp.ones_like, state.params)
  updates, _ = state.tx.update(grads, state.opt_state, state.params)
  plain = jax.tree.map(lambda u: u, updates)
  c.ternary_kernel_lr_multiplier = 1.0
  _, base = state_lib.create_mesh_and_state(c, model)
  base_updates, _ = base.tx.update(grads, base.opt_state, base.params)
  for name in ('features', 'proj'):  # multiplier 3 on both latent kernels, nothing else
    np.testing.assert_allclose(plain[name]['kernel'], 3 * base_updates[name]['kernel'], rtol=1e-6)
    np.testing.assert_allclose(plain[name]['w_p'], base_updates[name]['w_p'], rtol=1e-6)
  switched = state_lib.start_ternary(jax.device_get(state.params), c, state.ternary)
  for name in ('features', 'proj'):
    k = np.asarray(state.params[name]['kernel'])
    delta = 0.05 * np.abs(k).max()
    assert float(switched[name]['w_p']) == pytest.approx(k[k > delta].mean(), rel=1e-5)
  report = reports.quant_report(state, c)
  assert sorted(report['sparsity']) == ['features/kernel', 'proj/kernel']
  tensors = export_format.build_export(jax.device_get(state.params), {}, state.ternary, '2bit')
  assert {'params/features/kernel/codes', 'params/proj/kernel/codes'} <= set(tensors)
  assert 'params/features/kernel' not in tensors and 'params/proj/w_p' not in tensors


def test_init_from_an_orbax_checkpoint_of_a_plain_flax_model(smoke_config, tmp_path):
  """Your own FP training saved with orbax warm-starts the quantize()d model: every kernel is copied, the
  scales stay at init; a checkpoint that lacks a kernel is refused naming it."""
  import flax.linen as nn
  import orbax.checkpoint as ocp
  from ttq_jax import quant

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(10, name='head')(nn.Conv(4, (3, 3), name='conv')(x).mean(axis=(1, 2)))

  x = jnp.zeros((1, 28, 28, 1))
  plain = Net().init(jax.random.PRNGKey(7), x)['params']
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / 'fp'), {'params': plain})
  checkpointer.save(str(tmp_path / 'partial'), {'conv': plain['conv']})  # a bare params tree, no head
  checkpointer.wait_until_finished()
  model = quant.quantize(Net(), [quant.Rule(module_path='conv')])
  _, state = state_lib.create_mesh_and_state(smoke_config, model)
  loaded, record = ckpt.load_init_from(state, str(tmp_path / 'fp'))
  loaded = jax.device_get(loaded)
  assert record['step'] is None and record['params_sha256'] == ckpt.params_sha256(plain)
  for name in ('conv', 'head'):
    np.testing.assert_array_equal(loaded.params[name]['kernel'], plain[name]['kernel'])
  assert float(loaded.params['conv']['w_p']) == 1.0
  with pytest.raises(CheckpointError, match=r"for 1 of this model's kernels \(head/kernel\)"):
    ckpt.load_init_from(state, str(tmp_path / 'partial'))


def test_a_checkpoint_of_another_state_structure_is_named_as_such(smoke_config, tmp_path):
  """Not 'unreadable': written with other settings that change the optimizer state (here the multiplier)."""
  smoke_config.ternary_kernel_lr_multiplier = 1.0
  _, state = state_lib.create_mesh_and_state(smoke_config)
  manager = ckpt.create_manager(str(tmp_path))
  ckpt.save(manager, 3, state, {'next_index': 3}, force=True)
  manager.wait_until_finished()
  manager.close()
  smoke_config.ternary_kernel_lr_multiplier = 10.0
  with pytest.raises(CheckpointError, match='hold another state structure than this run builds') as e:
    workdirs.restore(smoke_config, str(tmp_path))
  assert '\n' not in str(e.value)
