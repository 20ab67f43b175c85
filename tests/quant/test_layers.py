"""Layers made ternary by rules (`quant.quantize` of a plain Flax layer: the one way) and the reporting helpers."""

import dataclasses
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import quant
from ttq_jax.quant import QuantConfig, Rule

TTQ = QuantConfig(method='ttq', t=0.05)


def ternary(layer: nn.Module, q: QuantConfig = TTQ) -> nn.Module:
  """`layer` with its kernel quantized by `q` (one rule selecting it)."""
  return quant.quantize(layer, [Rule(**dataclasses.asdict(q))])


def _kernel(w, w_p, w_n, q):
  return quant.METHODS[q.method].kernel(w, {'w_p': w_p, 'w_n': w_n}, q)


@pytest.mark.parametrize('kwargs', [
    dict(features=5, kernel_size=(3, 3)),
    dict(features=4, kernel_size=(5, 5), strides=2, padding='VALID', use_bias=False),
    dict(features=6, kernel_size=(3, 3), feature_group_count=2),
])
def test_fp_conv_is_exactly_nn_conv(kwargs):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 4))
  ours = ternary(nn.Conv(**kwargs), QuantConfig(method='fp'))
  ref = nn.Conv(**kwargs)
  variables = ref.init(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(ours.apply(variables, x), ref.apply(variables, x))
  assert jax.tree.structure(ours.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(variables)


def test_fp_dense_is_exactly_nn_dense():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 7))
  variables = nn.Dense(4).init(jax.random.PRNGKey(1), x)
  np.testing.assert_array_equal(
      ternary(nn.Dense(4), QuantConfig(method='fp')).apply(variables, x), nn.Dense(4).apply(variables, x))


def test_ttq_conv_uses_ternary_kernel_and_scales():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3))
  layer = ternary(nn.Conv(4, (3, 3)), QuantConfig(w_p_init=0.7, w_n_init=0.3))
  variables = layer.init(jax.random.PRNGKey(1), x)
  params = variables['params']
  assert float(params['w_p']) == pytest.approx(0.7) and float(params['w_n']) == pytest.approx(0.3)
  k = params['kernel']
  delta = 0.05 * jnp.max(jnp.abs(k))
  wt = jnp.where(k > delta, 0.7, jnp.where(k < -delta, -0.3, 0.0))
  expected = nn.Conv(4, (3, 3)).apply({'params': {'kernel': wt, 'bias': params['bias']}}, x)
  np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-6)


class _TinyNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.avg_pool(x, (2, 2))  # linear, so the output stays linear in every scale
    x = nn.Conv(2, (3, 3), strides=2)(x)
    return jnp.mean(x, axis=(1, 2))


def test_scale_gradients_match_finite_differences():
  """The output is linear in each layer's w_p, w_n: central differences are exact up to rounding."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  model = ternary(_TinyNet())
  params = model.init(jax.random.PRNGKey(1), x)['params']
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 1.3 if p[-1].key == 'w_p' else (v * 0.6 if p[-1].key == 'w_n' else v), params)
  target = jnp.array([[1.0, -1.0], [0.5, 2.0]])
  loss = lambda p: jnp.sum((model.apply({'params': p}, x) - target) ** 2)
  grads = jax.grad(loss)(params)
  h = 1e-2
  for layer in ('Conv_0', 'Conv_1'):
    for scale in ('w_p', 'w_n'):
      def shifted(eps):
        p = jax.tree.map(lambda v: v, params)
        p[layer] = dict(p[layer], **{scale: p[layer][scale] + eps})
        return loss(p)
      fd = (shifted(h) - shifted(-h)) / (2 * h)
      assert float(grads[layer][scale]) == pytest.approx(float(fd), rel=2e-3, abs=1e-4), (layer, scale)
      assert abs(float(fd)) > 1e-3  # the check is not vacuous


def test_positive_scales_option():
  w = jnp.array([-1.0, 1.0])
  k = _kernel(w, jnp.float32(-0.5), jnp.float32(-2.0), QuantConfig(positive_scales=True))
  np.testing.assert_allclose(k, [-2.0, 0.5])
  k = _kernel(w, jnp.float32(-0.5), jnp.float32(-2.0), QuantConfig())
  np.testing.assert_allclose(k, [2.0, -0.5])  # the official behaviour: scales may flip sign


def test_twn_layer_has_no_trained_scales():
  x = jnp.ones((1, 5))
  v = ternary(nn.Dense(3), QuantConfig(method='twn')).init(jax.random.PRNGKey(0), x)
  assert set(v['params']) == {'kernel', 'bias'}
  k = v['params']['kernel']
  np.testing.assert_allclose(_kernel(k, None, None, QuantConfig(method='twn')), quant.twn_ternarize(k))


def test_bf16_compute_keeps_float32_params():
  """Params stay float32; with distinct w_p = 1.5 and w_n = 0.5 the bfloat16 layer computes the same ternary kernel
  as float32 (a plain conv on the hand-made kernel codes * scales), to bfloat16 rounding."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 3)).astype(jnp.bfloat16)
  layer = ternary(nn.Conv(4, (3, 3), dtype=jnp.bfloat16))
  v = flax.core.unfreeze(layer.init(jax.random.PRNGKey(0), x))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))
  v['params']['w_p'], v['params']['w_n'] = jnp.float32(1.5), jnp.float32(0.5)
  y = layer.apply(v, x)
  assert y.dtype == jnp.bfloat16
  kernel = np.asarray(v['params']['kernel'])
  delta = 0.05 * np.abs(kernel).max()
  by_hand = np.where(kernel > delta, 1.5, np.where(kernel < -delta, -0.5, 0.0)).astype(np.float32)
  expected = nn.Conv(4, (3, 3)).apply({'params': {'kernel': by_hand, 'bias': v['params']['bias']}}, x.astype(jnp.float32))
  np.testing.assert_allclose(y.astype(jnp.float32), expected, rtol=3e-2, atol=3e-2)
  y32 = ternary(nn.Conv(4, (3, 3))).apply(v, x.astype(jnp.float32))
  np.testing.assert_allclose(y32, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs,msg', [
    (dict(method='int8'), "quant.method='int8' is unknown: allowed are ttq, twn, bitnet, paretoq, fp"),
    (dict(threshold='median'), "quant.threshold='median' is unknown: allowed are None (the method's own), max, mean, sparsity, absmean"),
    (dict(k=0.0), 'quant.k=0.0 is out of range: allowed is quant.k > 0'),
    (dict(t=1.0), 'quant.t=1.0 is out of range'),
    (dict(sparsity=-0.1), 'quant.sparsity=-0.1 is out of range'),
    (dict(threshold='absmean'), "quant.threshold='absmean' does not combine with quant.method='ttq': allowed are None "
                                "(the method's own) or max, mean, sparsity"),
    (dict(method='bitnet', threshold='max'), "quant.threshold='max' does not combine with quant.method='bitnet': "
                                             "allowed are None (the method's own) or absmean"),
    (dict(activations='int4'), "quant.activations='int4' is unknown: allowed are float, int8"),
])
def test_config_errors(kwargs, msg):
  with pytest.raises(ValueError, match=re.escape(msg)):
    QuantConfig(**kwargs)


def test_report_helpers():
  """Reports follow the layers the rules select: named ternary layers included, the full-precision stem
  excluded (whatever the names say)."""
  x = jnp.ones((1, 8, 8, 3))
  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3), name='TernaryLooking')(x)   # full precision, whatever its name
      x = nn.Conv(4, (3, 3), name='body')(x)
      return nn.Dense(2)(x.reshape(1, -1))
  rule = dict(dataclasses.asdict(TTQ))
  Net = lambda: quant.quantize(Plain(), [Rule(module_path='TernaryLooking', method='fp'),
                                         Rule(module_path='body|Dense_0', **rule)])
  layers = quant.ternary_layers(Net(), x)
  assert [l.path for l in layers] == ['Dense_0', 'body'] and all(l.quant.method == 'ttq' for l in layers)
  params = Net().init(jax.random.PRNGKey(0), x)['params']
  params['body']['kernel'] = jnp.linspace(-1, 1, 144).reshape(3, 3, 4, 4)
  params['body']['w_p'] = jnp.float32(2.0)
  sparsity = quant.layer_sparsity(params, layers)
  assert sorted(sparsity) == ['Dense_0/kernel', 'body/kernel']
  # linspace(-1, 1, 144): delta = 0.05, |w| <= 0.05 holds for 8 of 144 values (spacing 2/143).
  assert sparsity['body/kernel'] == pytest.approx(8 / 144)
  assert quant.layer_scales(params, layers)['body/kernel'] == (2.0, 1.0)
  kernels = quant.ternary_kernels(params, layers)
  assert set(np.unique(np.asarray(kernels['body/kernel'])).tolist()) == {-1.0, 0.0, 2.0}
  counts = quant.count_params(params, layers)
  assert counts['ternary'] == 144 + 256 * 2
  assert counts['full_precision'] == (3 * 3 * 3 * 4 + 4) + (4 + 2) + (2 + 2)
  assert quant.layer_sparsity(params, ()) == {}
  fp_layers = quant.ternary_layers(quant.quantize(Plain(), [Rule(method='fp')]), x)  # 'fp' rules make none ternary
  assert quant.ternary_layers(nn.Dense(3), jnp.ones((1, 2))) == () and fp_layers == ()
