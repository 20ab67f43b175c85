"""Model tests: parameter counts by hand formula, which layers are ternary, output shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import models
from ttq_jax import quant
from ttq_jax.quant import QuantConfig, count_params

TTQ = QuantConfig()


def _params(name, shape, num_classes, quant=TTQ, **kw):
  model = models.create_model(name, num_classes=num_classes, quant=quant, **kw)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))['params']


def _layers(name, shape, num_classes, q=TTQ, **kw):
  """The model's ternary layers, found in its module tree."""
  model = models.create_model(name, num_classes=num_classes, quant=q, **kw)
  return quant.ternary_layers(model, jnp.zeros(shape), train=False)


def _n(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _resnet_cifar_count(n, in_ch=3, classes=10):
  convs = 9 * in_ch * 16 + 2 * n * 9 * 16 * 16
  convs += 9 * 16 * 32 + (2 * n - 1) * 9 * 32 * 32 + 9 * 32 * 64 + (2 * n - 1) * 9 * 64 * 64
  return convs + 2 * _bn(n) + 64 * classes + classes


def _bn(n):
  # bn0 (shared by the first block) + bn2 of the first block + bn1 / bn2 of the others (bn1 normalises the
  # block's input: the previous stage's width) + bnlast
  return 16 + (2 * n - 1) * 16 + (16 + 32 + (2 * n - 2) * 32) + (32 + 64 + (2 * n - 2) * 64) + 64


@pytest.mark.parametrize('name,n', [('resnet20', 3), ('resnet32', 5), ('resnet44', 7), ('resnet56', 9)])
def test_cifar_resnet_parameter_counts(name, n):
  fp = _params(name, (1, 32, 32, 3), 10, QuantConfig(method='fp'))
  assert _n(fp) == _resnet_cifar_count(n)
  ttq = _params(name, (1, 32, 32, 3), 10, full_precision='conv0')  # the official CIFAR layout
  counts = count_params(ttq, _layers(name, (1, 32, 32, 3), 10, full_precision='conv0'))
  # every conv but conv0 is ternary and so is `linear`'s kernel (its bias is not); +2 scales per layer
  assert counts['ternary'] == _resnet_cifar_count(n) - 9 * 3 * 16 - 2 * _bn(n) - 10
  assert _n(ttq) == _n(fp) + 2 * (6 * n + 1)


def test_resnet20_and_alexnet_match_the_official_logs():
  """`Total param=` of the official training logs (trainable variables: kernels, BN, biases, W_p / W_n)."""
  assert _n(_params('resnet20', (1, 32, 32, 3), 10, full_precision='conv0')) == 269_760
  assert _n(_params('alexnet', (1, 224, 224, 3), 1000)) == 60_981_236


def test_resnet20_works_on_28x28x1():
  assert _n(_params('resnet20', (1, 28, 28, 1), 10, QuantConfig(method='fp'))) == _resnet_cifar_count(3, in_ch=1)


def test_imagenet_parameter_counts():
  assert _n(_params('resnet18', (1, 224, 224, 3), 1000, QuantConfig(method='fp'))) == 11_689_512  # = torchvision
  alexnet = (12 * 12 * 3 * 96 + 5 * 5 * 48 * 256 + 3 * 3 * 256 * 384 + 3 * 3 * 192 * 384 + 3 * 3 * 192 * 256
             + 9216 * 4096 + 4096 * 4096 + 4096 * 1000 + 1000 + 2 * (256 + 384 + 384 + 256 + 4096 + 4096))
  params = _params('alexnet', (1, 224, 224, 3), 1000, QuantConfig(method='fp'))
  assert _n(params) == alexnet and 'bias' not in params['conv0']  # the official conv0 has no bias


@pytest.mark.parametrize('full_precision,expected', [
    ('edges', {'conv0', 'linear'}),  # the paper text / AlexNet layout
    ('conv0', {'conv0'}),            # the official CIFAR code: `linear` is ternary
    ('', set()),                     # everything with a kernel
    ('res3_0/conv.*|linear', {'conv0', 'res3_0/conv1', 'res3_0/conv2', 'linear'} - {'conv0'}),
])
def test_full_precision_layers_by_path(full_precision, expected):
  layers = {l.path for l in _layers('resnet_tiny', (1, 28, 28, 1), 10, full_precision=full_precision)}
  every = {'conv0', 'linear'} | {f'res{s}_0/conv{c}' for s in (1, 2, 3) for c in (1, 2)}
  assert layers == every - expected


def _bn_eval(x, eps):
  return x / np.sqrt(1.0 + eps)  # scale 1, bias 0, running mean 0 / var 1


def _avgpool_pad(x, out_ch):
  n, h, w, c = x.shape
  pooled = x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  pad = out_ch - c
  return np.pad(pooled, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))


def test_cifar_resnet_structure_by_value():
  """With every block's convs zeroed, a block is its shortcut: the network is conv0-bn0-relu, the first
  block passes the stem's activation through (no bn1 of its own), each downsampling block averages 2x2
  windows and zero-pads channels on both sides, then bnlast-relu-mean-linear. Checked against numpy."""
  model = models.create_model('resnet_tiny', num_classes=3, quant=QuantConfig(method='fp'))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 2))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  params = variables['params']
  assert 'bn1' not in params['res1_0'] and 'bn1' in params['res2_0']
  for block in ('res1_0', 'res2_0', 'res3_0'):
    for c in ('conv1', 'conv2'):
      params[block][c]['kernel'] = jnp.zeros_like(params[block][c]['kernel'])
  out = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, train=False)
  stem = jax.lax.conv_general_dilated(x, params['conv0']['kernel'], (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  h = np.maximum(_bn_eval(np.asarray(stem), 1e-5), 0)           # bn0 + relu, then res1_0 = identity
  h = _avgpool_pad(_avgpool_pad(h, 8), 8)                        # res2_0 (4 -> 8 ch), res3_0 (8 -> 8)
  h = np.maximum(_bn_eval(h, 1e-5), 0).mean(axis=(1, 2))
  want = h @ np.asarray(params['linear']['kernel']) + np.asarray(params['linear']['bias'])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_ghost_batch_norm_normalises_each_group_by_hand():
  x = jnp.array([[1.0, 10.0], [3.0, 14.0], [-2.0, 0.0], [2.0, 0.0]])
  bn = models.BatchNorm(use_running_average=False, ghost_batch_size=2, epsilon=0.0)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  # groups {1, 3} and {-2, 2} (feature 0): mean 2 / 0, std 1 / 2; feature 1: {10, 14} std 2, {0, 0} std 0
  np.testing.assert_allclose(y[:, 0], [-1.0, 1.0, -1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(y[:2, 1], [-1.0, 1.0], rtol=1e-6)
  stats = updates['batch_stats']
  np.testing.assert_allclose(stats['mean'], 0.1 * np.array([(2 + 0) / 2, (12 + 0) / 2]), rtol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * np.array([(1 + 4) / 2, (4 + 0) / 2]), rtol=1e-6)
  whole = models.BatchNorm(use_running_average=False, epsilon=0.0)
  np.testing.assert_allclose(whole.apply(variables, x, mutable=['batch_stats'])[0][:, 0],
                             (x[:, 0] - 1.0) / np.std(np.asarray(x[:, 0])), rtol=1e-6)


def test_unbiased_variance_normalises_with_n_over_n_minus_1_and_averages_the_biased_one():
  """tensorpack's BatchNorm: training groups normalised with var x N / (N - 1) (N examples per group); the
  running average keeps the biased variance."""
  x = jnp.array([[1.0], [3.0], [-2.0], [2.0]])  # groups of 2: {1, 3} biased var 1, {-2, 2} biased var 4
  bn = models.BatchNorm(use_running_average=False, ghost_batch_size=2, epsilon=0.0, unbiased_variance=True)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  # unbiased: var x 2 / 1 -> std sqrt(2) and sqrt(8): (1 - 2) / sqrt(2), (-2 - 0) / sqrt(8)
  np.testing.assert_allclose(y[:, 0], [-1 / np.sqrt(2), 1 / np.sqrt(2), -2 / np.sqrt(8), 2 / np.sqrt(8)], rtol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'], [0.9 + 0.1 * (1 + 4) / 2], rtol=1e-6)
  # one group of 4 (mean 1, biased var 3.5): x 4 / 3
  whole = models.BatchNorm(use_running_average=False, epsilon=0.0, unbiased_variance=True)
  np.testing.assert_allclose(whole.apply(variables, x, mutable=['batch_stats'])[0][:, 0],
                             (np.array([1.0, 3.0, -2.0, 2.0]) - 1.0) / np.sqrt(3.5 * 4 / 3), rtol=1e-6)


def test_batch_norm_bias_init_of_tensorpack_is_uniform_sqrt_3():
  x = jnp.zeros((2, 4096))
  beta = models.BatchNorm(use_running_average=False, bias_init='uniform_unit_scaling').init(
      jax.random.PRNGKey(0), x)['params']['bias']
  assert float(jnp.max(jnp.abs(beta))) <= np.sqrt(3) and float(jnp.max(beta)) > 1.7 and float(jnp.min(beta)) < -1.7
  assert float(jnp.var(beta)) == pytest.approx(1.0, rel=0.1)  # U(-a, a) has variance a^2 / 3 = 1
  zeros = models.BatchNorm(use_running_average=False).init(jax.random.PRNGKey(0), x)['params']['bias']
  np.testing.assert_array_equal(zeros, 0.0)


@pytest.mark.parametrize('spec,unbiased,bias_init', [
    ('configs/resnet20_cifar10.py', True, 'uniform_unit_scaling'),
    ('configs/resnet20_cifar10.py:fp', True, 'uniform_unit_scaling'),
    ('configs/alexnet_imagenet.py', True, 'uniform_unit_scaling'),
    ('configs/resnet18_imagenet.py', False, 'zeros'),       # fb.resnet.torch
    ('configs/fashion_mnist.py:paper', False, 'zeros'),     # Flax's batch norm (named deviation)
])
def test_configs_batch_norm_settings_reach_the_model(spec, unbiased, bias_init):
  from configs import paper_rows
  from ttq_jax import state as state_lib
  model = state_lib.create_model(paper_rows.load_config(spec))
  assert (model.bn_unbiased_variance, model.bn_bias_init) == (unbiased, bias_init)


def test_alexnet_batch_norm_epsilon_is_the_official_1e_4():
  x = jnp.full((1, 3), 0.01)
  variables = {'params': {'scale': jnp.ones(3), 'bias': jnp.zeros(3)},
               'batch_stats': {'mean': jnp.zeros(3), 'var': jnp.zeros(3)}}
  eps = models.AlexNet().bn_epsilon
  y = models.BatchNorm(use_running_average=True, epsilon=eps).apply(variables, x)
  np.testing.assert_allclose(y, 0.01 / np.sqrt(1e-4) * np.ones((1, 3)), rtol=1e-6)


def test_batch_norm_and_biases_never_quantized():
  """Even with every layer ternary, only kernels are ternary: every BN parameter and every bias stays out
  of the ternary set, and a ternary layer adds its bias in full precision."""
  from ttq_jax.quant import Rule, quantize, ternary_weights
  model = models.create_model('resnet_tiny', num_classes=10, quant=TTQ, full_precision='')
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)['params']
  layers = quant.ternary_layers(model, jnp.zeros((1, 28, 28, 1)), train=False)
  ternary = set(ternary_weights(params, layers))
  assert ternary and all(p.endswith('/kernel') for p in ternary)
  kept = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
          if path[-1].key == 'bias' or any(k.key.startswith('bn') for k in path)]
  assert any(p[-1].key == 'bias' for p in kept) and any(p[-1].key == 'scale' for p in kept)
  assert not ternary & {'/'.join(k.key for k in p) for p in kept}
  kernels = {'/'.join(k.key for k in p[:-1]) + '/kernel': int(np.prod(v.shape))
             for p, v in jax.tree_util.tree_flatten_with_path(params)[0] if p[-1].key == 'kernel'}
  assert count_params(params, layers)['ternary'] == sum(kernels[p] for p in ternary) == sum(kernels.values())
  layer = quantize(nn.Dense(2), [Rule()])
  v = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))
  v = {'params': dict(v['params'], bias=jnp.array([0.123, -0.456]))}
  np.testing.assert_array_equal(layer.apply(v, jnp.zeros((1, 3))), np.float32([[0.123, -0.456]]))


@pytest.mark.parametrize('name,shape,classes', [
    ('resnet_tiny', (2, 28, 28, 1), 10), ('resnet_tiny', (2, 32, 32, 3), 10), ('alexnet_tiny', (2, 224, 224, 3), 7)])
@pytest.mark.parametrize('method', ['fp', 'ttq', 'twn'])
def test_forward_shapes_and_methods_share_param_paths(name, shape, classes, method):
  model = models.create_model(name, num_classes=classes, quant=QuantConfig(method=method))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
  logits = model.apply(variables, jnp.ones(shape), train=False)
  assert logits.shape == (shape[0], classes) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  fp_paths = {p for p, _ in jax.tree_util.tree_flatten_with_path(_params(name, shape, classes, QuantConfig(method='fp')))[0]}
  paths = {p for p, _ in jax.tree_util.tree_flatten_with_path(variables['params'])[0]}
  assert fp_paths <= paths  # TTQ adds only w_p / w_n


def test_unknown_model_is_a_clear_error():
  with pytest.raises(ValueError, match="model.name='vgg16' is unknown"):
    models.create_model('vgg16', num_classes=10, quant=TTQ)


def test_ghost_batch_size_needs_batch_norm():
  with pytest.raises(ValueError, match="model.bn_ghost_batch_size=4 needs a model with batch norm"):
    models.create_model('vit_tiny', num_classes=10, quant=TTQ, ghost_batch_size=4)
  with pytest.raises(ValueError, match="model.bn_unbiased_variance / model.bn_bias_init need a model with batch norm"):
    models.create_model('vit_tiny', num_classes=10, quant=TTQ, bn_unbiased_variance=True)
