"""Model tests: parameter counts by hand formula, which layers are ternary, output shapes."""

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
  bn_channels = (2 * n * 16) + (16 + 32 + (2 * n - 2) * 32) + (32 + 64 + (2 * n - 2) * 64) + 64
  return convs + 2 * bn_channels + 64 * classes + classes


@pytest.mark.parametrize('name,n', [('resnet20', 3), ('resnet32', 5), ('resnet44', 7), ('resnet56', 9)])
def test_cifar_resnet_parameter_counts(name, n):
  fp = _params(name, (1, 32, 32, 3), 10, QuantConfig(method='fp'))
  assert _n(fp) == _resnet_cifar_count(n)
  ttq = _params(name, (1, 32, 32, 3), 10)
  counts = count_params(ttq, _layers(name, (1, 32, 32, 3), 10))
  # every conv but the first is ternary; the last dense stays full precision; +2 scales per layer
  assert counts['ternary'] == _resnet_cifar_count(n) - 9 * 3 * 16 - 2 * _bn(n) - 650
  assert _n(ttq) == _n(fp) + 2 * (6 * n)


def _bn(n):
  return (2 * n * 16) + (16 + 32 + (2 * n - 2) * 32) + (32 + 64 + (2 * n - 2) * 64) + 64


def test_resnet20_is_0_27m_and_works_on_28x28x1():
  p = _params('resnet20', (1, 28, 28, 1), 10, QuantConfig(method='fp'))
  assert _n(p) == _resnet_cifar_count(3, in_ch=1) == 269_434


def test_imagenet_parameter_counts():
  assert _n(_params('resnet18', (1, 224, 224, 3), 1000, QuantConfig(method='fp'))) == 11_689_512  # = torchvision
  alexnet = (12 * 12 * 3 * 96 + 96 + 5 * 5 * 48 * 256 + 3 * 3 * 256 * 384 + 3 * 3 * 192 * 384 + 3 * 3 * 192 * 256
             + 9216 * 4096 + 4096 * 4096 + 4096 * 1000 + 1000 + 2 * (256 + 384 + 384 + 256 + 4096 + 4096))
  assert _n(_params('alexnet', (1, 224, 224, 3), 1000, QuantConfig(method='fp'))) == alexnet == 60_981_320


def test_first_and_last_full_precision_by_default_and_switch():
  p = _params('resnet_tiny', (1, 28, 28, 1), 10)
  assert 'Conv_0' in p and 'Dense_0' in p and 'w_p' not in p['Conv_0']
  q = _params('resnet_tiny', (1, 28, 28, 1), 10, quantize_first_last=True)
  assert 'Conv_0' not in q and 'w_p' in q['TernaryConv_0'] and 'w_p' in q['TernaryDense_0']
  ternary = lambda params, **kw: count_params(params, _layers('resnet_tiny', (1, 28, 28, 1), 10, **kw))['ternary']
  assert ternary(q, quantize_first_last=True) == ternary(p) + 9 * 4 + 8 * 10


def test_batch_norm_and_biases_never_quantized():
  """Even with the first and last layer ternary, only kernels are ternary: every BN parameter and every
  bias stays out of the ternary set, and a ternary layer adds its bias in full precision."""
  from ttq_jax.quant import TernaryDense, ternary_weights
  model = models.create_model('resnet_tiny', num_classes=10, quant=TTQ, quantize_first_last=True)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False)['params']
  layers = quant.ternary_layers(model, jnp.zeros((1, 28, 28, 1)), train=False)
  ternary = set(ternary_weights(params, layers))
  assert ternary and all(p.endswith('/kernel') for p in ternary)
  kept = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
          if path[-1].key == 'bias' or any(k.key.startswith('BatchNorm') for k in path)]
  assert any(p[-1].key == 'bias' for p in kept) and any(p[-1].key == 'scale' for p in kept)
  assert not ternary & {'/'.join(k.key for k in p) for p in kept}
  assert count_params(params, layers)['ternary'] == sum(
      int(np.prod(np.shape(params[p.split('/')[0]]['kernel']))) for p in ternary if p.count('/') == 1) + sum(
      int(np.prod(np.shape(params[p.split('/')[0]][p.split('/')[1]]['kernel']))) for p in ternary if p.count('/') == 2)
  layer = TernaryDense(2, quant=TTQ)
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
