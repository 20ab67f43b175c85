"""Threshold rule x scale rule: every (method, threshold) pair by value, forward and gradients, export and
reload; `threshold=None` is each method's own rule (what every config computed before the choice existed)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import export
from ttq_jax import export_format
from ttq_jax import quant
from ttq_jax.quant import QuantConfig, TernaryWeights

# 9 weights: max|w| = 2, mean|w| = 4.13 / 9; sorted |w|: 0, .05, .05, .11, .12, .3, .5, 1, 2
W = jnp.array([-2.0, -0.5, -0.05, 0.0, 0.05, 0.3, 1.0, -0.12, 0.11], jnp.float32)
G = jnp.arange(1.0, 10.0)
DELTAS = {'max': 0.05 * 2.0, 'mean': 0.7 * 4.13 / 9, 'sparsity': 0.11}  # sparsity 0.5: round(4.5) = 4th smallest
CODES = {
    'max': [-1, -1, 0, 0, 0, 1, 1, -1, 1],
    'mean': [-1, -1, 0, 0, 0, 0, 1, 0, 0],
    'sparsity': [-1, -1, 0, 0, 0, 1, 1, -1, 0],
}
ALPHA = {'max': (2 + .5 + .3 + 1 + .12 + .11) / 6, 'mean': (2 + .5 + 1) / 3, 'sparsity': (2 + .5 + .3 + 1 + .12) / 5}
W_P, W_N = 1.5, 0.5
PAIRS = [(m, t) for m in ('ttq', 'twn') for t in ('max', 'mean', 'sparsity')]


def _config(method, threshold):
  return QuantConfig(method=method, threshold=threshold, t=0.05, k=0.7, sparsity=0.5)


def _kernel(w, w_p, w_n, q):
  """The forward kernel of q's method (`quant.METHODS[q.method].kernel`), as a selected layer computes it."""
  return quant.METHODS[q.method].kernel(w, {'w_p': w_p, 'w_n': w_n}, q)


@pytest.mark.parametrize('threshold', ['max', 'mean', 'sparsity'])
def test_delta_by_value(threshold):
  assert float(quant.threshold(W, _config('ttq', threshold))) == pytest.approx(DELTAS[threshold], rel=1e-6)


@pytest.mark.parametrize('method,threshold', PAIRS)
def test_forward_and_gradients_by_value(method, threshold):
  codes = np.asarray(CODES[threshold])
  q = _config(method, threshold)
  if method == 'ttq':
    kernel = lambda w, w_p, w_n: _kernel(w, w_p, w_n, q)
    expected = np.where(codes > 0, W_P, np.where(codes < 0, -W_N, 0.0))
    out, grads = jax.value_and_grad(lambda *a: jnp.sum(kernel(*a) * G), argnums=(0, 1, 2))(W, jnp.float32(W_P),
                                                                                           jnp.float32(W_N))
    np.testing.assert_allclose(kernel(W, jnp.float32(W_P), jnp.float32(W_N)), expected, rtol=1e-6)
    dw, dw_p, dw_n = grads
    g = np.asarray(G)
    assert float(dw_p) == pytest.approx(g[codes > 0].sum())
    assert float(dw_n) == pytest.approx(-g[codes < 0].sum())  # the corrected sign: wt = -w_n
    np.testing.assert_allclose(dw, np.where(codes > 0, W_P, np.where(codes < 0, W_N, 1.0)) * g, rtol=1e-6)
  else:
    kernel = lambda w: _kernel(w, None, None, q)
    np.testing.assert_allclose(kernel(W), codes * ALPHA[threshold], rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda w: jnp.sum(kernel(w) * G))(W), G)  # straight through
  tw = TernaryWeights.from_latent(W, {'w_p': jnp.float32(W_P), 'w_n': jnp.float32(W_N)}, q)  # what reports and export use
  np.testing.assert_array_equal(tw.codes, codes)
  if method == 'twn':
    assert float(tw.w_p) == float(tw.w_n) == pytest.approx(ALPHA[threshold], rel=1e-6)


@pytest.mark.parametrize('method', ['ttq', 'twn'])
def test_none_is_the_methods_own_rule(method):
  """threshold=None: TTQ's max with t, TWN's mean with k = 0.7 (exactly what each computed before the
  threshold became a choice: the old TWN formula is `twn_ternarize` without a delta)."""
  own = QuantConfig(method=method)
  assert own.threshold is None and own.threshold_rule == {'ttq': 'max', 'twn': 'mean'}[method]
  explicit = QuantConfig(method=method, threshold=own.threshold_rule)
  a = _kernel(W, jnp.float32(W_P), jnp.float32(W_N), own)
  np.testing.assert_array_equal(a, _kernel(W, jnp.float32(W_P), jnp.float32(W_N), explicit))
  if method == 'twn':
    np.testing.assert_array_equal(a, quant.twn_ternarize(W))
    np.testing.assert_allclose(a, np.asarray(CODES['mean']) * ALPHA['mean'], rtol=1e-6)


def test_twn_ignores_t_unless_max_is_named():
  """The old README's `method=twn, t=0.1` changed nothing; the max rule must be named to use t."""
  base = _kernel(W, None, None, QuantConfig(method='twn'))
  np.testing.assert_array_equal(base, _kernel(W, None, None, QuantConfig(method='twn', t=0.1)))
  named = _kernel(W, None, None, QuantConfig(method='twn', threshold='max', t=0.1))
  assert int(jnp.sum(named == 0)) == int(np.sum(np.abs(np.asarray(W)) <= 0.2)) == 5


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3), name='conv')(x))
    return nn.Dense(3, name='head')(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize('method,threshold', PAIRS)
def test_export_and_reload_each_pair(tmp_path, method, threshold):
  """The file holds the codes of the pair's rule and its scales; the reloaded plain model computes what the
  quantized model computed."""
  q = _config(method, threshold)
  model = quant.quantize(_Net(), [quant.Rule(module_path='conv|head', **{f: getattr(q, f) for f in
                                                                          ('method', 'threshold', 't', 'k', 'sparsity')})])
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 2))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  if method == 'ttq':
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v * (1.3 if p[-1].key == 'w_p' else 0.7) if p[-1].key in ('w_p', 'w_n') else v, params)
  layers = quant.ternary_layers(model, x)
  assert [l.quant.threshold_rule for l in layers] == [threshold, threshold]
  path = os.path.join(tmp_path, 'm.safetensors')
  export_format.save(path, export_format.build_export(params, {}, layers, '2bit'), packing='2bit', config={}, step=1)
  plain, loaded = export.load(path, model=model)
  np.testing.assert_allclose(plain.apply(loaded, x), model.apply({'params': params}, x), rtol=1e-5, atol=1e-6)
  _, _, report = export_format.read(path)
  kernel = params['conv']['kernel']
  expected = TernaryWeights.from_latent(kernel, {'w_p': params['conv'].get('w_p'), 'w_n': params['conv'].get('w_n')}, q)
  assert report['params/conv/kernel']['sparsity'] == pytest.approx(expected.sparsity)
  np.testing.assert_array_equal(loaded['params']['conv']['kernel'], expected.dense())


# A Dense kernel (in 4, out 3) whose third column is ~20x smaller than the others.
SMALL_COLUMN = jnp.array([[1.0, -0.8, 0.05], [-0.4, 0.2, -0.02], [0.1, 1.2, 0.04], [-0.9, -0.1, -0.01]], jnp.float32)
# per column, TWN's own rule: delta_c = 0.7 * mean|w_c| = 0.42, 0.4025, 0.021; alpha_c = mean |w_c| above delta_c
PER_CHANNEL_TWN = np.array([[0.95, -1.0, 0.045], [0.0, 0.0, 0.0], [0.0, 1.0, 0.045], [-0.95, 0.0, 0.0]], np.float32)


@pytest.mark.parametrize('threshold,expected', [
    (None, PER_CHANNEL_TWN),
    # 'max' per column, t = 0.7: delta_c = 0.7, 0.84, 0.035 -> alpha_c = 0.95, 1.2, 0.045
    ('max', np.array([[0.95, 0.0, 0.045], [0.0, 0.0, 0.0], [0.0, 1.2, 0.045], [-0.95, 0.0, 0.0]], np.float32)),
])
def test_per_channel_twn_takes_delta_and_alpha_per_output_channel(tmp_path, threshold, expected):
  """With scale_granularity='channel', TWN's threshold and alpha are per output column, so the small column keeps
  its nonzeros (per tensor, delta = 0.7 * 0.4017 = 0.281 zeroes it whole); export (v2, per channel) and reload."""
  rule = quant.Rule(method='twn', threshold=threshold, t=0.7, scale_granularity='channel')  # the top-level layer
  model = quant.quantize(nn.Dense(3, use_bias=False, name='d'), [rule])
  x = jnp.eye(4)
  params = {'kernel': SMALL_COLUMN}
  np.testing.assert_allclose(model.apply({'params': params}, x), expected, rtol=1e-6, atol=1e-7)
  layer = quant.TernaryLayer('', rule, (1, 3))
  tw = TernaryWeights.from_latent(SMALL_COLUMN, None, rule, layer.scale_shape)
  np.testing.assert_allclose(tw.dense(), expected, rtol=1e-6)
  assert tw.w_p.shape == (1, 3)
  per_tensor = quant.quantize(nn.Dense(3, use_bias=False, name='d'), [quant.Rule(method='twn')])
  assert not np.any(per_tensor.apply({'params': params}, x)[:, 2])  # the bug this guards against
  path = os.path.join(tmp_path, 'twn.safetensors')
  layers = quant.ternary_layers(model, x)
  assert layers[0].scale_shape == (1, 3)
  export_format.save(path, export_format.build_export(params, {}, layers, '2bit'), packing='2bit', config={}, step=1)
  variables, _, report = export_format.read(path)
  np.testing.assert_allclose(variables['params']['kernel'], expected, rtol=1e-6)
  assert report['params/kernel']['per_channel']


def test_per_channel_sparsity_threshold_zeroes_the_fraction_in_every_channel():
  delta = quant.delta_from_sparsity(SMALL_COLUMN, 0.5, axes=(0,))
  np.testing.assert_allclose(delta, [[0.4, 0.2, 0.02]])  # the 2nd smallest |w| of each column
