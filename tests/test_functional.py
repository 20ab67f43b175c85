"""NNX models in the training loop (`ttq_jax.functional.NNXModel`): apply equals the module's own call, batch
statistics and dropout as NNX computes them, the full-precision twin, refusals; the held-out NNX model (convs, a
list of MLP blocks, an Einsum, FP stem and head by rule, per-channel scales on one layer, batch norm, dropout)
trains on 2 devices, resumes bit for bit, evaluates and exports, and the exported NNX model scores training's
accuracy from the raw test images; the NNX LM decoder trains as the Linen one from the same weights."""

import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import make_lm_smoke_config, metrics_rows
from tests.quant.test_nnx import RULES, TERNARY, Block
from ttq_jax import evaluation, export, functional, lm, lm_nnx, quant, state as state_lib, train, workdirs
from ttq_jax.errors import ConfigError


class Net(nnx.Module):
  """tests/quant/test_nnx.py's held-out model with batch norm after its ternary conv and dropout before its head."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.conv = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
    self.blocks = nnx.List([Block(rngs), Block(rngs)])
    self.mix = nnx.Einsum('bd,dhk->bhk', (4, 2, 3), (2, 3), rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(nnx.relu(self.stem(x))))).mean(axis=(1, 2))
    for block in self.blocks:
      x = block(x)
    return self.head(self.drop(self.mix(x).reshape(x.shape[0], -1)))


X = jax.random.normal(jax.random.PRNGKey(1), (8, 6, 6, 2))


def _data(n_train=256, n_test=128):
  """uint8 6x6x2 images whose class is which channel is bright (0, 1) or neither (2): learnable in a few steps."""
  rng = np.random.default_rng(0)
  def make(n):
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 80, (n, 6, 6, 2))
    for i, c in enumerate(labels):
      if c < 2:
        images[i, ..., c] += 60
    return images.astype(np.uint8), labels.astype(np.int32)
  return {'train': make(n_train), 'test': make(n_test), 'mean': (80.0, 80.0), 'std': (70.0, 70.0)}


def _config(smoke_config, steps=8):
  config = smoke_config
  config.optimizer, config.learning_rate, config.warmup_epochs, config.weight_decay = 'adam', 1e-2, 0.0, 0.0
  config.bn_recalibration_batches, config.target_accuracy, config.fp_warmup_epochs = 0, 0.0, 0.0
  config.ternary_kernel_lr_multiplier = 1.0
  config.quant.scale_init = 'mean_abs'
  config.batch_size, config.eval_batch_size = 32, 64
  config.num_epochs, config.num_train_steps = 1.0, steps
  config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = 4
  config.mesh_shape = (2, 1)
  return config


# --------------------------------------------------------------------------- NNXModel


def test_apply_is_the_modules_call_with_its_batch_stats_and_step_seeded_dropout():
  net = Net(nnx.Rngs(0))
  model = functional.NNXModel(net)
  variables = model.init()
  assert set(variables) == {'params', 'batch_stats'} and set(variables['batch_stats']) == {'bn'}
  assert set(variables['params']['blocks']) == {'0', '1'}  # list indices as strings, as every params tree here
  reference = nnx.clone(net)
  reference.eval()
  np.testing.assert_array_equal(model.apply(variables, X, train=False), reference(X))
  # train mode: BN normalises with the batch and updates its statistics exactly as the module's own call
  reference.train()
  reference.drop.rngs.key.set_value(jax.random.wrap_key_data(jax.random.PRNGKey(5)))  # apply's rngs['dropout']
  reference.drop.rngs.count.set_value(jnp.zeros((), jnp.uint32))
  out, updates = model.apply(variables, X, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(5)})
  np.testing.assert_allclose(out, reference(X), rtol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['bn']['mean'], reference.bn.mean[...], rtol=1e-6)
  assert not np.allclose(updates['batch_stats']['bn']['mean'], 0.0)
  # dropout draws from the key it is given: the same key, the same mask; another key, another
  again = model.apply(variables, X, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(5)})[0]
  other = model.apply(variables, X, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(6)})[0]
  np.testing.assert_array_equal(again, out)
  assert not np.allclose(other, out)
  assert float(net.bn.mean[...].sum()) == 0.0  # the given module is not changed


def test_full_precision_twin_computes_with_the_latent_kernels_of_the_same_variables():
  quantized = functional.NNXModel(quant.quantize(Net(nnx.Rngs(0)), RULES))
  variables = quantized.init()
  assert 'w_p' in variables['params']['conv'] and variables['params']['conv']['w_p'].shape == (4,)
  plain = functional.NNXModel(quantized.plain().module)
  assert 'w_p' not in plain.init()['params']['conv'] and type(plain.module.conv) is nnx.Conv
  twin = quantized.unquantized()
  np.testing.assert_allclose(twin.apply(variables, X), plain.apply(variables, X), rtol=1e-6)
  assert not np.allclose(quantized.apply(variables, X), plain.apply(variables, X))
  assert [layer.path for layer in quantized.ternary_layers()] == sorted(TERNARY) and quantized.name == 'Net'


class _NoCall(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(2, 2, rngs=rngs)


class _NeedsMask(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(72, 3, rngs=rngs)

  def __call__(self, x, mask):
    return self.dense(x.reshape(x.shape[0], -1)) * mask


class _Bridged(nn.Module):  # a Linen model with NNX layers inside: the rules cannot see them
  @nn.compact
  def __call__(self, x):
    return nnx.bridge.to_linen(nnx.Linear, 72, 3, name='inner')(x.reshape(x.shape[0], -1))


def test_models_the_loop_cannot_run_are_refused_in_one_line(smoke_config, tmp_path):
  cases = [(object(), 'model=object is neither a Flax Linen module nor a Flax NNX module'),
           (_NoCall(nnx.Rngs(0)), 'model=_NoCall is an NNX module without a __call__'),
           (nnx.bridge.ToLinen(nnx.Linear, args=(72, 3)), 'model=nnx.bridge.ToLinen(Linear) hides its NNX layers'),
           (_NeedsMask(nnx.Rngs(0)), "model=_NeedsMask: the training loop calls model(inputs) with inputs float32[1, 6, "
                                     "6, 2], which its __call__ does not take")]
  for model, message in cases:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
      train.train_and_evaluate(smoke_config, str(tmp_path / 'w'), model=model, data=_data(64, 32))
    assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=re.escape("the layers of 'inner' are an NNX module inside Linen")):
    quant.ternary_layers(quant.quantize(_Bridged(), [quant.Rule()]), jnp.zeros((1, 6, 6, 2)))
  assert not (tmp_path / 'w').exists()  # nothing written, not even the folder


# --------------------------------------------------------------------------- the loop


@pytest.fixture(scope='module')
def nnx_run(tmp_path_factory):
  from tests.conftest import make_smoke_config
  workdir = str(tmp_path_factory.mktemp('nnx') / 'run')
  config, data = _config(make_smoke_config()), _data()
  model = quant.quantize(Net(nnx.Rngs(0)), RULES)
  result = train.train_and_evaluate(config, workdir, model=model, data=data)
  return config, data, model, workdir, result


@pytest.mark.slow
def test_nnx_model_trains_and_reports_its_layers(nnx_run):
  _, _, model, workdir, result = nnx_run
  assert result['step'] == 8 and result['ternary_steps'] == 8
  assert sorted(result['layer_rules']) == sorted(result['sparsity']) == sorted(f'{p}/kernel' for p in TERNARY)
  assert result['layer_rules']['conv/kernel']['scale_granularity'] == 'channel'
  assert result['top1_accuracy'] > 0.5  # 3 classes: it learned (chance 1/3)
  rows = metrics_rows(workdir)
  assert [r['step'] for r in rows] == [4, 8] and rows[1]['train_loss'] < rows[0]['train_loss']
  assert 'flip_rate/conv' in rows[1] and 'near_threshold/blocks/0/up' in rows[0]
  state = workdirs.restore(None, workdir, model=model).state
  assert float(np.abs(state.batch_stats['bn']['mean']).sum()) > 0  # BN statistics trained and checkpointed


@pytest.mark.slow
def test_nnx_model_resumes_bit_for_bit_and_evaluates_to_trainings_number(nnx_run, tmp_path):
  config, data, model, workdir, result = nnx_run
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '8'))  # as if killed between steps 4 and 8
  os.remove(os.path.join(resumed, 'metrics.jsonl'))
  again = train.train_and_evaluate(config, resumed, model=model, data=data)
  assert [r['step'] for r in metrics_rows(resumed)] == [8]
  a, b = (workdirs.restore(None, w, model=model).state for w in (workdir, resumed))
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)), jax.tree.leaves((b.params, b.batch_stats,
                                                                                          b.opt_state))):
    np.testing.assert_array_equal(x, y)
  assert again['top1_accuracy'] == result['top1_accuracy']
  evaluated = evaluation.evaluate_workdir(None, workdir, model=model, data=data)
  assert evaluated['top1_accuracy'] == result['top1_accuracy'] and evaluated['step'] == 8
  one_device = config.copy_and_resolve_references()
  one_device.mesh_shape = (1, 1)  # trained on 2 devices, evaluated on 1: the same number
  single = evaluation.evaluate_workdir(one_device, workdir, model=model, data=data)
  assert single['top1_accuracy'] == result['top1_accuracy']
  assert single['loss'] == pytest.approx(result['loss'], rel=1e-5)


@pytest.mark.slow
def test_exported_nnx_model_scores_trainings_accuracy_from_raw_images(nnx_run):
  _, data, model, workdir, result = nnx_run
  summary = export.export_workdir(None, workdir, model=model, data=data)
  assert summary['layers']['params/conv/kernel']['per_channel']
  loaded, state = export.load(summary['path'], model=model)
  assert type(loaded) is Net and type(loaded.conv) is nnx.Conv and not hasattr(loaded.conv, 'w_p')
  assert set(nnx.to_pure_dict(state)) >= {'conv', 'bn', 'blocks'}
  images, labels = data['test']
  x = (images.astype(np.float32) - np.asarray(data['mean'])) / np.asarray(data['std'])
  kernel = np.asarray(loaded.conv.kernel[...])
  assert len(np.unique(kernel[..., 0])) <= 3  # dense ternary kernels: {-w_n, 0, w_p} per output channel
  accuracy = float(np.mean(np.argmax(np.asarray(loaded(jnp.asarray(x))), -1) == labels))
  assert accuracy == pytest.approx(result['top1_accuracy'], abs=1e-9)


@pytest.mark.slow
def test_nnx_and_linen_lm_decoders_train_alike_from_the_same_weights(text_corpus, tmp_path):
  """The Linen decoder's initial parameters loaded into the NNX one: same TTQ training, same bits per byte (the two
  compute the same ops: measured identical to the last bit on a 2-core Xeon; the tolerance allows other backends'
  rounding)."""
  config = make_lm_smoke_config(text_corpus)
  rules = [quant.Rule(module_path=lm.PROJECTIONS, threshold='max', t=0.05)]
  sizes = dict(depth=1, width=32, num_heads=2, mlp_width=64)
  linen = quant.quantize(lm.LMDecoder(**sizes), rules)
  info_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # the loop's init key (state.create_train_state)
  params = linen.init(info_rng, jnp.zeros((1, config.data.seq_len), jnp.int32))['params']
  nnx_model = lm_nnx.from_linen_params(quant.quantize(lm_nnx.LMDecoderNNX(**sizes, rngs=nnx.Rngs(1)), rules),
                                       jax.device_get(params))
  a = train.train_and_evaluate(config, str(tmp_path / 'linen'), model=linen)
  b = train.train_and_evaluate(config, str(tmp_path / 'nnx'), model=nnx_model)
  assert b['bits_per_byte'] == pytest.approx(a['bits_per_byte'], abs=1e-4)
  assert a['layer_rules'] == b['layer_rules'] and a['param_counts'] == b['param_counts']


def test_lm_decoder_nnx_has_the_linen_decoders_layers_and_parameter_count(text_corpus):
  config = make_lm_smoke_config(text_corpus)
  config.model.name = 'lm_decoder_nnx'
  model = state_lib.create_model(config)
  config.model.name = 'lm_decoder'
  linen = state_lib.create_model(config)
  tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
  counts = [sum(x.size for x in jax.tree.leaves(m.init(jax.random.PRNGKey(0), tokens)['params'])) for m in (model, linen)]
  assert counts[0] == counts[1]
  assert [layer.path for layer in model.ternary_layers()] == [layer.path for layer in quant.ternary_layers(linen, tokens)]
