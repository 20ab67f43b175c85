"""quantize(model, rules): TTQ for an unmodified Flax model, checked against hand-ternarized kernels."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import quant
from ttq_jax.quant import Rule


class Block(nn.Module):
  @nn.compact
  def __call__(self, y):
    y = nn.DenseGeneral((2, 3), name='proj')(y)                  # kernel (4, 2, 3): two output axes
    y = nn.Einsum((2, 3, 5), 'btij,ijk->btk', name='mix')(y)     # kernel (2, 3, 5): output axis k
    return nn.relu(nn.Dense(4)(y))                               # auto-named Dense_0


class Zoo(nn.Module):
  """Explicit names, nesting, a grouped dilated causal 1-D conv, DenseGeneral, Einsum, a 2-D conv."""

  @nn.compact
  def __call__(self, x):                                                        # x: (B, 8, 6)
    y = nn.Conv(4, (3,), kernel_dilation=2, feature_group_count=2, padding='CAUSAL', name='conv1d')(x)
    y = Block(name='block')(y)                                                  # (B, 8, 4)
    y = nn.Conv(6, (3, 3), strides=2, kernel_dilation=(1, 2), feature_group_count=2, padding='VALID',
                name='conv2d')(y[..., None, :].repeat(6, axis=-2))              # (B, 8, 6, 4) -> (B, 3, 1, 6)
    return nn.Dense(5, name='head')(y.reshape(y.shape[0], -1))


RULES = [Rule(module_path='head', method='fp'),                     # selected, stays full precision
         Rule(module_path='block/proj', scale_granularity='channel'),
         Rule(module_path='block/.*'),
         Rule(module_path='conv.d', t=0.1)]
TTQ_LAYERS = {'block/proj': RULES[1], 'block/mix': RULES[2], 'block/Dense_0': RULES[2], 'conv1d': RULES[3],
              'conv2d': RULES[3]}
X = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 6))


def _get(tree, path):
  for k in path.split('/'):
    tree = tree[k]
  return tree


def _quantized_variables():
  model = quant.quantize(Zoo(), RULES)
  params = flax.core.unfreeze(model.init(jax.random.PRNGKey(0), X)['params'])
  rng = np.random.default_rng(0)
  for path in TTQ_LAYERS:  # scales away from their init, per channel where the rule says so
    layer = _get(params, path)
    layer['w_p'] = jnp.asarray(rng.uniform(0.5, 2.0, np.shape(layer['w_p'])), jnp.float32)
    layer['w_n'] = jnp.asarray(rng.uniform(0.5, 2.0, np.shape(layer['w_n'])), jnp.float32)
  return model, params


def _by_hand(params):
  """The plain model's params with every selected TTQ kernel replaced by hand with `ternarize`."""
  plain = jax.tree.map(lambda x: x, params)
  for path, rule in TTQ_LAYERS.items():
    layer = _get(plain, path)
    kernel = layer.pop('kernel')
    w_p, w_n = layer.pop('w_p'), layer.pop('w_n')
    if rule.scale_granularity == 'channel':  # block/proj: one scale per output feature, axes (1, 2) of (4, 2, 3)
      w_p, w_n = w_p.reshape(1, 2, 3), w_n.reshape(1, 2, 3)
    layer['kernel'] = quant.ternarize(kernel, w_p, w_n, quant.delta_from_max(kernel, rule.t))
  return plain


def test_params_are_the_plain_models_plus_scales():
  model, params = _quantized_variables()
  plain = Zoo().init(jax.random.PRNGKey(0), X)['params']
  paths = lambda t: {'/'.join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]}
  added = paths(params) - paths(plain)
  assert paths(plain) <= paths(params)  # a checkpoint of the plain FP model loads as it is
  assert added == {f'{p}/{s}' for p in TTQ_LAYERS for s in ('w_p', 'w_n')}
  assert np.shape(_get(params, 'block/proj')['w_p']) == (6,) and np.shape(_get(params, 'conv1d')['w_p']) == ()
  for p, _ in jax.tree_util.tree_flatten_with_path(plain)[0]:  # same init: the latent kernels are the plain ones
    np.testing.assert_array_equal(_get(params, '/'.join(k.key for k in p)), _get(plain, '/'.join(k.key for k in p)))


def test_output_equals_the_model_with_kernels_ternarized_by_hand():
  model, params = _quantized_variables()
  np.testing.assert_allclose(model.apply({'params': params}, X), Zoo().apply({'params': _by_hand(params)}, X),
                             rtol=1e-6, atol=1e-6)


def test_unselected_layers_are_bit_for_bit_the_fp_model():
  model = quant.quantize(Zoo(), [Rule(module_path='nothing'), Rule(module_path='head', method='fp')])
  with pytest.warns(UserWarning, match="rules that selected no layer: 'nothing'") as record:
    variables = model.init(jax.random.PRNGKey(0), X)
  message = str(record[0].message)  # names every layer the rules could have selected
  assert all(p in message for p in ('head', *TTQ_LAYERS)), message
  np.testing.assert_array_equal(model.apply(variables, X), Zoo().apply(variables, X))


def test_scale_gradients_are_the_hand_sums():
  """dL/dw_p = sum of dL/dwt over I_p, dL/dw_n = -sum over I_n (per output feature for block/proj), where
  dL/dwt is the plain model's kernel gradient at the ternary kernels."""
  model, params = _quantized_variables()
  c = jax.random.normal(jax.random.PRNGKey(2), (2, 5))
  grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, X) * c))(params)
  plain = _by_hand(params)
  g_plain = jax.grad(lambda p: jnp.sum(Zoo().apply({'params': p}, X) * c))(plain)
  for path, rule in TTQ_LAYERS.items():
    kernel = _get(params, path)['kernel']
    delta = rule.t * np.abs(np.asarray(kernel)).max()
    g = np.asarray(_get(g_plain, path)['kernel'], np.float64)
    pos, neg = np.asarray(kernel) > delta, np.asarray(kernel) < -delta
    if rule.scale_granularity == 'channel':
      want_p, want_n = (np.where(pos, g, 0).sum(0).reshape(-1), -np.where(neg, g, 0).sum(0).reshape(-1))
    else:
      want_p, want_n = np.where(pos, g, 0).sum(), -np.where(neg, g, 0).sum()
    np.testing.assert_allclose(_get(grads, path)['w_p'], want_p, rtol=1e-4, atol=1e-5, err_msg=path)
    np.testing.assert_allclose(_get(grads, path)['w_n'], want_n, rtol=1e-4, atol=1e-5, err_msg=path)
    # latent kernel: the scaled straight-through estimator
    w_p, w_n = (np.asarray(_get(params, path)[s]).reshape((1, 2, 3) if rule.scale_granularity == 'channel' else ())
                for s in ('w_p', 'w_n'))
    np.testing.assert_allclose(_get(grads, path)['kernel'], np.where(pos, w_p * g, np.where(neg, w_n * g, g)),
                               rtol=1e-4, atol=1e-5, err_msg=path)


def test_per_channel_scale_gradient_by_central_differences():
  """The gradient of one w_p / w_n entry against a central difference of the loss, computed in float64 (in
  float32 the rounding of the two large losses is ~0.4% of their difference, and depends on XLA's summation
  order)."""
  model, params = _quantized_variables()
  loss = lambda p: jnp.sum(model.apply({'params': p}, X) ** 2)
  grad = jax.grad(loss)(params)
  for s, i in (('w_p', 4), ('w_n', 1)):
    def at(eps):
      with jax.enable_x64(True):
        p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        _get(p, 'block/proj')[s] = _get(p, 'block/proj')[s].at[i].add(eps)
        return float(jnp.sum(model.apply({'params': p}, jnp.asarray(X, jnp.float64)) ** 2))
    eps = 1e-2
    # the loss is quadratic in the scale while no ReLU input changes sign: the central difference is exact
    np.testing.assert_allclose((at(eps) - at(-eps)) / (2 * eps), _get(grad, 'block/proj')[s][i], rtol=1e-4)


def test_selected_layers_is_structural():
  model = quant.quantize(Zoo(), RULES)
  selected = quant.selected_layers(model, X)
  assert selected == {'head': RULES[0], **TTQ_LAYERS}


def test_an_embedding_table_is_refused():
  class WithEmbed(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return nn.Dense(3)(nn.Embed(10, 4, name='emb')(tokens))
  tokens = jnp.array([[1, 2, 3], [4, 5, 9]], jnp.int32)
  with pytest.raises(ValueError, match="method='ttq'\\) selects the nn.Embed at 'emb': embedding tables cannot be ternary"):
    quant.quantize(WithEmbed(), [Rule(module_path='.*')]).init(jax.random.PRNGKey(0), tokens)
  # an 'fp' rule asks for nothing, so it may select the table (the README's `Rule('embed|head', method='fp')`)
  model = quant.quantize(WithEmbed(), [Rule(module_path='emb', method='fp'), Rule(module_path='.*')])
  variables = model.init(jax.random.PRNGKey(0), tokens)
  assert set(variables['params']['Dense_0']) == {'kernel', 'bias', 'w_p', 'w_n'} and set(variables['params']['emb']) == {'embedding'}
  assert [l.path for l in quant.ternary_layers(model, tokens)] == ['Dense_0']


def test_attention_projections_are_dense_general():
  class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name='attn')(x)
  model = quant.quantize(Attn(), [Rule(module_path='attn/(query|key|value|out)')])
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3, 4)))['params']
  assert all('w_p' in params['attn'][k] for k in ('query', 'key', 'value', 'out'))


@pytest.mark.parametrize('granularity', ['tensor', 'channel'])
def test_bfloat16_model_ternarizes_in_float32(granularity):
  """A latent weight just above the float32 threshold stays +w_p although in bfloat16 it would equal the
  threshold: the codes the forward pass uses are `TernaryWeights.from_latent`'s (what export writes)."""
  rule = Rule(scale_granularity=granularity)
  model = quant.quantize(nn.Dense(3, use_bias=False, dtype=jnp.bfloat16), [rule])
  kernel = jnp.array([[1.0, 0.05006, -0.05006], [0.3, -0.04, 0.0]], jnp.float32)  # delta = 0.05
  params = flax.core.unfreeze(model.init(jax.random.PRNGKey(0), jnp.ones((1, 2)))['params'])
  params['kernel'] = kernel
  params['w_p'], params['w_n'] = jnp.full_like(params['w_p'], 1.5), jnp.full_like(params['w_n'], 0.5)  # exact in bf16
  forward = model.apply({'params': params}, jnp.eye(2, dtype=jnp.bfloat16))  # rows of the ternary kernel
  shape = (1, 3) if granularity == 'channel' else ()
  scales = {k: params[k].reshape(shape) for k in ('w_p', 'w_n')}
  tw = quant.TernaryWeights.from_latent(kernel, scales, rule, shape)
  assert float(jnp.bfloat16(0.05006)) <= float(jnp.bfloat16(0.05))  # bf16 would have decided 0 here
  np.testing.assert_array_equal(tw.codes, [[1, 1, -1], [1, 0, 0]])
  np.testing.assert_array_equal(np.asarray(forward, np.float32), [[1.5, 1.5, -0.5], [1.5, 0.0, 0.0]])  # by value
  np.testing.assert_array_equal(np.asarray(forward, np.float32), tw.dense())


def test_rule_validation():
  with pytest.raises(ValueError, match="scale_granularity='row' is unknown"):
    Rule(scale_granularity='row')
  with pytest.raises(ValueError, match="module_path='\\(' is not a regex"):
    Rule(module_path='(')
  with pytest.raises(ValueError, match="quant.method='binary' is unknown"):
    Rule(method='binary')


@pytest.mark.parametrize('layer,x_shape', [
    (lambda: nn.ConvTranspose(3, (3, 3), strides=(2, 2), name='layer'), (2, 5, 5, 2)),
    (lambda: nn.Conv(3, (2, 3, 3), name='layer'), (2, 4, 6, 6, 2)),     # 3-D convolution
])
def test_conv_transpose_and_3d_conv_against_hand_ternarized_kernels(layer, x_shape):
  class One(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layer()(x)
  x = jax.random.normal(jax.random.PRNGKey(1), x_shape)
  model = quant.quantize(One(), [Rule(module_path='layer')])
  params = model.init(jax.random.PRNGKey(0), x)['params']
  params = {'layer': dict(params['layer'], w_p=jnp.float32(1.3), w_n=jnp.float32(0.7))}
  k = np.asarray(params['layer']['kernel'])
  delta = 0.05 * np.abs(k).max()
  by_hand = np.where(k > delta, 1.3, np.where(k < -delta, -0.7, 0.0)).astype(np.float32)
  assert 0 < np.mean(by_hand == 0) < 0.5
  plain = {'layer': {'kernel': jnp.asarray(by_hand), 'bias': params['layer']['bias']}}
  np.testing.assert_allclose(model.apply({'params': params}, x), One().apply({'params': plain}, x), rtol=1e-5, atol=1e-5)
