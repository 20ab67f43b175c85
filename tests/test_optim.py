"""Optimizer tests: schedules by hand, the first updates of weights and scales, masks, the multiplier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import optim
from ttq_jax.quant import QuantConfig, TernaryLayer

CONV = (TernaryLayer('TernaryConv_0', QuantConfig()),)  # the one ternary layer of the hand-made params


def layers_of(params):
  """The TTQ layers of a hand-written params dict: the modules holding w_p / w_n."""
  return tuple(TernaryLayer(name, QuantConfig()) for name, module in params.items() if 'w_p' in module)


def test_learning_rate_schedules(smoke_config):
  c = smoke_config
  c.num_train_steps = 100
  c.data.limit_examples = 640  # 10 steps per epoch
  c.lr_schedule = 'piecewise'
  c.learning_rate = 0.1
  c.lr_boundaries_epochs = (3.0, 6.0)
  c.lr_values = (0.01, 0.001)
  fn = optim.create_learning_rate_fn(c)
  assert [float(fn(s)) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  scale_fn = optim.create_learning_rate_fn(c, 1e-3)
  assert float(scale_fn(30)) == pytest.approx(1e-4)  # same shape, own base rate
  c.lr_schedule = 'cosine'
  c.warmup_epochs = 1.0
  fn = optim.create_learning_rate_fn(c)
  assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(0.05) and float(fn(10)) == pytest.approx(0.1)
  assert float(fn(55)) == pytest.approx(0.05, abs=1e-3) and float(fn(100)) == pytest.approx(0.0, abs=1e-6)
  c.lr_schedule = 'constant'
  fn = optim.create_learning_rate_fn(c)
  assert [float(fn(s)) for s in (0, 5, 10, 99)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


def test_every_schedule_and_optimizer_in_the_tables_builds(smoke_config):
  for name in optim.SCHEDULES:
    smoke_config.lr_schedule = name
    assert np.isfinite(float(optim.create_learning_rate_fn(smoke_config)(3)))
  params = {'TernaryConv_0': {'kernel': jnp.ones(3), 'w_p': jnp.float32(1.0), 'w_n': jnp.float32(1.0)}}
  for name in optim.OPTIMIZERS:
    for scales in optim.SCALE_OPTIMIZERS:
      smoke_config.optimizer, smoke_config.scale_optimizer = name, scales
      tx = optim.create_optimizer(smoke_config, params, layers_of(params))
      updates, _ = tx.update(params, tx.init(params), params)
      assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


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
  tx = optim.create_optimizer(c, params, layers_of(params))
  updates, _ = tx.update(grads, tx.init(params), params)
  u = updates['TernaryConv_0']
  np.testing.assert_allclose(u['kernel'], [-0.05 * (0.1 + 0.01), -0.05 * (0.2 - 0.02)], rtol=1e-6)
  np.testing.assert_allclose(u['bias'], [-0.05], rtol=1e-6)
  assert float(u['w_p']) == pytest.approx(-0.002, rel=1e-4) and float(u['w_n']) == pytest.approx(0.002, rel=1e-4)
  c.weight_decay_regex = r'(kernel|w_p|w_n)$'  # the official CIFAR regularizer: kernels and scales
  c.scale_optimizer = 'same'
  tx = optim.create_optimizer(c, params, layers_of(params))
  u = tx.update(grads, tx.init(params), params)[0]['TernaryConv_0']
  assert float(u['w_p']) == pytest.approx(-0.05 * (3.0 + 0.01))


def test_adamw_decouples_weight_decay_from_the_gradient(smoke_config):
  """Step 1 of Adam is lr * g / (|g| + eps) ~ lr * sign(g). AdamW then subtracts lr * wd * w from the params the
  decay regex selects: kernel [1, -2], g [0.1, 0.2], lr 0.05, wd 0.1 -> -0.05 * (1 + 0.1 * 1), -0.05 * (1 - 0.1 * 2);
  the bias (not selected) gets Adam's step alone. Adam with L2 instead adds wd * w to g before normalising, so
  its first step is -lr * sign(g + wd * w): the decay vanishes into the normalisation."""
  c = smoke_config
  c.lr_schedule, c.learning_rate, c.weight_decay, c.adam_eps = 'constant', 0.05, 0.1, 1e-8
  c.ternary_kernel_lr_multiplier, c.scale_optimizer = 1.0, 'same'
  params = {'Dense_0': {'kernel': jnp.array([1.0, -2.0]), 'bias': jnp.array([0.5]), 'w_p': jnp.float32(1.0),
                        'w_n': jnp.float32(1.0)}}
  grads = {'Dense_0': {'kernel': jnp.array([0.1, 0.2]), 'bias': jnp.array([1.0]), 'w_p': jnp.float32(3.0),
                       'w_n': jnp.float32(-0.5)}}
  updates = {}
  for name in ('adamw', 'adam'):
    c.optimizer = name
    tx = optim.create_optimizer(c, params, layers_of(params))
    updates[name] = tx.update(grads, tx.init(params), params)[0]['Dense_0']
  np.testing.assert_allclose(updates['adamw']['kernel'], [-0.05 * (1 + 0.1), -0.05 * (1 - 0.2)], rtol=1e-5)
  np.testing.assert_allclose(updates['adamw']['bias'], [-0.05], rtol=1e-5)
  assert float(updates['adamw']['w_p']) == pytest.approx(-0.05, rel=1e-5)  # 'kernel$' does not select the scales
  # L2 with Adam: g + wd * w = [0.2, 0.0] -> steps -0.05 * sign: [-0.05, 0] (the decay only moved the sign's input)
  np.testing.assert_allclose(updates['adam']['kernel'], [-0.05, 0.0], rtol=1e-5, atol=1e-7)
  # Scales selected by the regex decay with their own Adam too (lr 0.002): decoupled under adamw, not dropped
  c.weight_decay_regex, c.scale_optimizer, c.scale_learning_rate, c.optimizer = r'(kernel|w_p|w_n)$', 'adam', 0.002, 'adamw'
  tx = optim.create_optimizer(c, params, layers_of(params))
  u = tx.update(grads, tx.init(params), params)[0]['Dense_0']
  assert float(u['w_p']) == pytest.approx(-0.002 * (1 + 0.1 * 1.0), rel=1e-5)
  assert float(u['w_n']) == pytest.approx(0.002 - 0.002 * 0.1 * 1.0, rel=1e-5)


def test_second_sgd_update_carries_momentum(smoke_config):
  """Official optimizer (momentum 0.9, no Nesterov): v2 = 0.9 * v1 + g, update = -lr * v2."""
  c = smoke_config
  c.nesterov, c.lr_schedule, c.learning_rate, c.weight_decay, c.momentum = False, 'constant', 0.1, 0.0, 0.9
  c.scale_optimizer, c.ternary_kernel_lr_multiplier = 'same', 1.0
  params = {'TernaryConv_0': {'kernel': jnp.array([1.0]), 'w_p': jnp.float32(1.0), 'w_n': jnp.float32(1.0)}}
  tx = optim.create_optimizer(c, params, layers_of(params))
  g1 = jax.tree.map(lambda x: jnp.full_like(x, 2.0), params)
  g2 = jax.tree.map(lambda x: jnp.full_like(x, -1.0), params)
  state = tx.init(params)
  _, state = tx.update(g1, state, params)
  u, _ = tx.update(g2, state, params)
  for leaf in jax.tree.leaves(u):  # -0.1 * (0.9 * 2 - 1) for weights and scales alike
    np.testing.assert_allclose(leaf, -0.1 * (0.9 * 2.0 - 1.0), rtol=1e-6)


def test_masks_name_what_each_setting_applies_to():
  params = {'TernaryConv_0': {'kernel': 0, 'w_p': 0, 'w_n': 0, 'bias': 0}, 'Conv_0': {'kernel': 0},
            'BatchNorm_0': {'scale': 0, 'bias': 0}, 'Block': {'TernaryDense_3': {'kernel': 0, 'w_p': 0, 'w_n': 0}}}
  layers = (TernaryLayer('TernaryConv_0', QuantConfig()), TernaryLayer('Block/TernaryDense_3', QuantConfig()))
  labels = optim.param_labels(params, layers)  # the scales the layers' method names, at their paths
  assert optim.param_labels(params) == jax.tree.map(lambda _: 'weight', params)  # no layer: no scale
  paretoq = optim.param_labels({'d': {'kernel': 0, 'alpha': 0}, 'prelu': {'alpha': 0}},
                               (TernaryLayer('d', QuantConfig(method='paretoq')),))
  assert paretoq == {'d': {'kernel': 'weight', 'alpha': 'scale'}, 'prelu': {'alpha': 'weight'}}
  assert labels['TernaryConv_0'] == {'kernel': 'weight', 'w_p': 'scale', 'w_n': 'scale', 'bias': 'weight'}
  assert labels['Block']['TernaryDense_3']['w_n'] == 'scale' and labels['BatchNorm_0']['scale'] == 'weight'
  decay = optim.weight_decay_mask(params, r'kernel$')
  assert decay['TernaryConv_0'] == {'kernel': True, 'w_p': False, 'w_n': False, 'bias': False}
  assert decay['Conv_0']['kernel'] and not decay['BatchNorm_0']['scale']
  official = optim.weight_decay_mask(params, r'(kernel|w_p|w_n)$')
  assert official['Block']['TernaryDense_3']['w_p'] and not official['TernaryConv_0']['bias']
  alexnet = optim.weight_decay_mask({'conv1': {'kernel': 0, 'w_p': 0}, 'fc0': {'kernel': 0, 'w_n': 0},
                                     'fct': {'kernel': 0, 'bias': 0}}, r'^fc.*/(kernel|w_p|w_n)$')
  assert alexnet == {'conv1': {'kernel': False, 'w_p': False}, 'fc0': {'kernel': True, 'w_n': True},
                     'fct': {'kernel': True, 'bias': False}}
  layers = (TernaryLayer('Block/TernaryDense_3', QuantConfig()), TernaryLayer('Conv_0', QuantConfig()))
  ternary = optim.ternary_kernel_mask(params, layers)  # the layers found in the module tree, not names
  assert ternary['Conv_0']['kernel'] and ternary['Block']['TernaryDense_3']['kernel']
  assert not ternary['TernaryConv_0']['kernel'] and not ternary['TernaryConv_0']['bias']
  twn = (TernaryLayer('Conv_0', QuantConfig(method='twn')), TernaryLayer('Block/TernaryDense_3', QuantConfig(method='bitnet')))
  assert not any(jax.tree.leaves(optim.ternary_kernel_mask(params, twn)))  # no trained scales: no multiplier


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
    tx = optim.create_optimizer(c, params, (TernaryLayer('TernaryConv_0', QuantConfig(method=method)),))
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
