"""ParetoQ's ternary quantizer (Liu et al. 2025; facebookresearch/ParetoQ `StretchedElasticQuant`, w_bits=0) by
hand-computed values: forward levels, ties at |u| = 1/3, clipping at 0.99, the LSQ-style gradients to w and alpha
(1 / sqrt(numel), per channel and per tensor, alpha clamped at eps), the layer's `alpha` and its init, bfloat16
compute with float32 decisions, export and reload, the settings it refuses."""

import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import export
from ttq_jax import export_format
from ttq_jax import quant
from ttq_jax.quant import QuantConfig, Rule

# alpha = 3 (per tensor): u = w / 3 = [1.0, 1/3, 0.34, -0.5, 0.3, -1.1]
W = jnp.array([3.0, 1.0, 1.02, -1.5, 0.9, -3.3], jnp.float32)
# round(clip(u, -.99, .99) * 1.5): 1.485 -> 1; 0.5 -> 0 (half to even); 0.51 -> 1; -0.75 -> -1; 0.45 -> 0; -1.485 -> -1
CODES = [1, 0, 1, -1, 0, -1]
G = jnp.arange(1.0, 7.0)


def reference(w, alpha, g, axis=None):
  """Upstream's forward and backward written out in numpy (float64), rows along `axis` (None: layerwise)."""
  w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
  a = np.maximum(np.asarray(alpha, np.float64), 1e-5)
  u = w / a
  q = np.round(np.clip(u, -0.99, 0.99) * 1.5) / 1.5
  s = np.where(u < -0.99, -1.0, np.where(u > 0.99, 1.0, q - u))
  dalpha = s * g / math.sqrt(w.size)
  dalpha = dalpha.sum() if axis is None else dalpha.sum(axis=axis, keepdims=True)
  return a * q, np.where(np.abs(u) <= 0.99, g, 0.0), dalpha


def test_forward_by_hand():
  wq = quant.paretoq_ternarize(W, jnp.float32(3.0))
  np.testing.assert_allclose(wq, 2.0 * np.asarray(CODES), rtol=1e-6)  # levels -2a/3, 0, +2a/3


def test_gradients_by_hand():
  """dW = g where |u| <= 0.99 (0 at u = 1.0 and -1.1); dalpha = sum(s * g) / sqrt(6) with s = +1, q - u, ..., -1."""
  loss = lambda w, a: jnp.sum(quant.paretoq_ternarize(w, a) * G)
  dw, dalpha = jax.grad(loss, argnums=(0, 1))(W, jnp.float32(3.0))
  np.testing.assert_allclose(dw, [0.0, 2.0, 3.0, 4.0, 5.0, 0.0])
  s = [1.0, 0.0 - 1 / 3, 2 / 3 - 0.34, -2 / 3 + 0.5, 0.0 - 0.3, -1.0]
  expected = sum(si * gi for si, gi in zip(s, range(1, 7))) / math.sqrt(6)
  np.testing.assert_allclose(float(dalpha), expected, rtol=1e-5)
  assert expected < 0  # (the sign matters: a larger alpha lowers this loss)


def test_per_channel_gradient_sums_each_row_over_the_whole_tensors_count():
  """Per output channel (a Dense kernel (in, out), alpha (1, out)): each alpha gets the sum over its column, still
  divided by sqrt(numel of the whole kernel), as upstream's per-row sum with grad_scale = 1 / sqrt(numel)."""
  w = jnp.array([[0.2, -1.0, 0.05], [0.9, 0.3, -0.3], [-0.5, 2.5, 0.01], [0.1, -0.2, 0.2]], jnp.float32)
  alpha = jnp.array([[0.9, 2.0, 0.25]], jnp.float32)
  g = jnp.arange(12.0).reshape(4, 3) - 5.0
  loss = lambda w, a: jnp.sum(quant.paretoq_ternarize(w, a) * g)
  (dw, dalpha), wq = jax.grad(loss, argnums=(0, 1))(w, alpha), quant.paretoq_ternarize(w, alpha)
  ref_wq, ref_dw, ref_dalpha = reference(w, alpha, g, axis=0)
  np.testing.assert_allclose(wq, ref_wq, rtol=1e-6)
  np.testing.assert_allclose(dw, ref_dw)
  np.testing.assert_allclose(dalpha, ref_dalpha, rtol=1e-5)
  assert dalpha.shape == (1, 3)


def test_alpha_clamped_at_eps_still_gets_its_gradient():
  """A negative alpha computes with a = 1e-5, and its gradient is not masked (upstream clamps outside autograd)."""
  w = jnp.array([1e-6, 5e-6, -2e-5, 2e-6], jnp.float32)  # u = .1, .5, -2, .2
  loss = lambda w, a: jnp.sum(quant.paretoq_ternarize(w, a) * jnp.array([1.0, 2.0, 3.0, 4.0]))
  wq = quant.paretoq_ternarize(w, jnp.float32(-1.0))
  np.testing.assert_allclose(wq, [0.0, 1e-5 / 1.5, -1e-5 / 1.5, 0.0], rtol=1e-5)
  dalpha = jax.grad(loss, argnums=1)(w, jnp.float32(-1.0))
  expected = ((0 - 0.1) * 1 + (2 / 3 - 0.5) * 2 + (-1.0) * 3 + (0 - 0.2) * 4) / 2.0
  np.testing.assert_allclose(float(dalpha), expected, rtol=1e-4)


class _Net(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), dtype=self.dtype, name='conv')(x))
    x = x.reshape(x.shape[0], -1, 4)
    x = nn.Einsum((4, 2, 3), 'bld,dhk->blhk', use_bias=False, dtype=self.dtype, name='mix')(x)
    return nn.Dense(3, dtype=self.dtype, name='head')(x.reshape(x.shape[0], -1))


def _model(granularity, dtype=jnp.float32):
  return quant.quantize(_Net(dtype), [Rule(module_path='conv|mix|head', method='paretoq', scale_granularity=granularity)])


X = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 2))
# the axes each layer's alpha reduces over per channel: Conv (3, 3, 2, 4) over all but the last; Einsum kernel
# (d, h, k) over d (output axes h, k flattened: 6 alphas); Dense (in, 3) over in
REDUCED = {'conv': (0, 1, 2), 'mix': (0,), 'head': (0,)}


@pytest.mark.parametrize('granularity', ['channel', 'tensor'])
def test_layers_hold_alpha_initialised_to_max_abs_and_compute_the_hand_ternarized_kernels(granularity):
  model = _model(granularity)
  params = model.init(jax.random.PRNGKey(0), X)['params']
  plain = {}
  for name, axes in REDUCED.items():
    kernel = np.asarray(params[name]['kernel'])
    assert set(params[name]) - {'bias'} == {'kernel', 'alpha'}  # no w_p / w_n
    if granularity == 'channel':
      expected = np.abs(kernel).max(axis=axes).reshape(-1)
      broadcast = np.abs(kernel).max(axis=axes, keepdims=True)
    else:
      expected = broadcast = np.abs(kernel).max()
    np.testing.assert_array_equal(params[name]['alpha'], expected)
    assert params[name]['alpha'].shape == np.shape(expected)
    wq, _, _ = reference(kernel, broadcast, np.zeros_like(kernel))
    plain[name] = {**{k: v for k, v in params[name].items() if k != 'alpha'}, 'kernel': jnp.asarray(wq, jnp.float32)}
  np.testing.assert_allclose(model.apply({'params': params}, X), _Net().apply({'params': plain}, X), rtol=1e-5, atol=1e-6)
  layers = quant.ternary_layers(model, X)
  assert [(l.path, l.quant.method) for l in layers] == [('conv', 'paretoq'), ('head', 'paretoq'), ('mix', 'paretoq')]
  assert [l.scale_paths for l in layers] == [('conv/alpha',), ('head/alpha',), ('mix/alpha',)]


def test_layer_gradients_reach_alpha_as_the_reference_says():
  model = _model('channel')
  params = model.init(jax.random.PRNGKey(0), X)['params']
  params['head']['alpha'] = params['head']['alpha'] * 0.6  # some weights clip
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, X) ** 2))(params)
  # the gradient of the head's output kernel, through a plain Dense on the ternary kernel
  wq = quant.paretoq_ternarize(params['head']['kernel'], params['head']['alpha'].reshape(1, -1))
  features = nn.relu(nn.Conv(4, (3, 3)).apply({'params': {'kernel': quant.paretoq_ternarize(
      params['conv']['kernel'], params['conv']['alpha'].reshape(1, 1, 1, -1)), 'bias': params['conv']['bias']}}, X))
  mixed = jnp.einsum('bld,dhk->blhk', features.reshape(2, -1, 4), quant.paretoq_ternarize(
      params['mix']['kernel'], params['mix']['alpha'].reshape(1, 2, 3))).reshape(2, -1)
  g_out = 2 * (mixed @ wq + params['head']['bias'])
  g_kernel = mixed.T @ g_out
  _, ref_dw, ref_dalpha = reference(params['head']['kernel'], params['head']['alpha'].reshape(1, -1), g_kernel, axis=0)
  np.testing.assert_allclose(grads['head']['kernel'], ref_dw, rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(grads['head']['alpha'], ref_dalpha.reshape(-1), rtol=2e-4, atol=1e-6)
  assert np.any(ref_dw == 0)  # (the clipped weights got no gradient)


def test_bfloat16_compute_takes_its_decisions_in_float32():
  model = _model('channel', jnp.bfloat16)
  params = model.init(jax.random.PRNGKey(0), X)['params']
  assert params['head']['alpha'].dtype == jnp.float32
  tw = quant.ternary_weights(params, quant.ternary_layers(model, X))['head/kernel']
  expected = np.round(np.clip(np.asarray(params['head']['kernel']) / np.asarray(params['head']['alpha']), -.99, .99) * 1.5)
  np.testing.assert_array_equal(tw.codes, expected)
  out32 = _model('channel').apply({'params': params}, X)
  np.testing.assert_allclose(np.asarray(model.apply({'params': params}, X), np.float32), out32, rtol=5e-2, atol=5e-2)


def test_export_holds_its_codes_and_two_thirds_of_alpha_and_reloads_to_the_same_logits(tmp_path):
  model = _model('channel')
  params = model.init(jax.random.PRNGKey(0), X)['params']
  params = jax.tree_util.tree_map_with_path(lambda p, v: v * 0.7 if p[-1].key == 'alpha' else v, params)
  layers = quant.ternary_layers(model, X)
  path = os.path.join(tmp_path, 'm.safetensors')
  tensors = export_format.build_export(params, {}, layers, '2bit')
  assert not any(k.endswith('/alpha') for k in tensors)  # packed with the codes, as w_p = w_n = 2a / 3
  np.testing.assert_allclose(tensors['params/head/kernel/w_p'], np.asarray(params['head']['alpha']) * 2 / 3, rtol=1e-6)
  export_format.save(path, tensors, packing='2bit', config={}, step=1)
  plain, loaded = export.load(path, model=model)
  np.testing.assert_allclose(plain.apply(loaded, X), model.apply({'params': params}, X), rtol=1e-5, atol=1e-6)
  _, _, report = export_format.read(path)
  assert report['params/head/kernel']['per_channel'] and 0 < report['params/head/kernel']['sparsity'] < 1


@pytest.mark.parametrize('kwargs,message', [
    (dict(threshold='max'), "quant.threshold='max' does not combine with quant.method='paretoq': allowed are None "
                            "(the method's own)"),
    (dict(w_p_init=0.5), "quant.w_p_init=0.5 does not apply to quant.method='paretoq' (its trained scales are alpha, "
                         'not w_p / w_n): allowed is 1.0'),
    (dict(positive_scales=True), "quant.positive_scales=True does not apply to quant.method='paretoq'"),
    (dict(scale_granularity='row'), "quant.scale_granularity='row' is unknown: allowed are tensor, channel"),
])
def test_settings_that_do_not_apply_are_refused_in_one_line(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    QuantConfig(method='paretoq', **kwargs)


def test_the_method_table_declares_its_scale_and_its_zero_band():
  spec = quant.METHODS['paretoq']
  assert spec.scale_names == ('alpha',) and spec.trained_scales and spec.scale_inits == ('max_abs',)
  q = QuantConfig(method='paretoq')
  assert spec.delta(W, {'alpha': jnp.float32(3.0)}, q) == pytest.approx(1.0)  # a / 3: |w| <= 1 is zero
  spec.check_scale_init(None)
  spec.check_scale_init('max_abs')
  with pytest.raises(ValueError, match="quant.scale_init='mean_abs' does not apply to quant.method='paretoq': allowed "
                                       r"are None \(the method's own, 'max_abs'\) or max_abs"):
    spec.check_scale_init('mean_abs')
