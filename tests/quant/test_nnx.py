"""`quant.quantize` on Flax NNX models: the same rules and method kernels as Linen. A model the project has not
seen (a conv stem and a head kept full precision by rule, a list of MLP blocks, an Einsum, per-channel scales on
one layer): scales as `nnx.Param`s beside the kernels, the given model unchanged, the forward pass equal to the
plain model with hand-ternarized kernels, TTQ's gradients by the paper's formulas through `nnx.grad`, ParetoQ
and int8 inputs, refusals."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttq_jax import quant
from ttq_jax.quant import Rule


class Block(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(4, 8, rngs=rngs)
    self.down = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.relu(self.up(x)))


class Net(nnx.Module):
  def __init__(self, rngs):
    self.stem = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.conv = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
    self.blocks = nnx.List([Block(rngs), Block(rngs)])
    self.mix = nnx.Einsum('bd,dhk->bhk', (4, 2, 3), (2, 3), rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(nnx.relu(self.stem(x)))).mean(axis=(1, 2))
    for block in self.blocks:
      x = block(x)
    return self.head(self.mix(x).reshape(x.shape[0], -1))


RULES = [Rule(module_path='stem|head', method='fp'), Rule(module_path='conv', scale_granularity='channel'), Rule()]
TERNARY = ('blocks/0/down', 'blocks/0/up', 'blocks/1/down', 'blocks/1/up', 'conv', 'mix')
X = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 2))


def _layer(model, path):
  for p, module in nnx.iter_modules(model):
    if '/'.join(map(str, p)) == path:
      return module
  raise KeyError(path)


def _state_at(state, path):
  """The sub-state of an `nnx.State` (what `nnx.grad` returns) at a layer path ('blocks/0/down')."""
  for part in path.split('/'):
    state = state[int(part) if part.isdigit() else part]
  return state


def _with_distinct_scales(model):
  """w_p / w_n set apart per layer (1.3 / 0.6, per channel 1.3 + 0.1 c / 0.6), so a swapped scale shows."""
  for path in TERNARY:
    layer = _layer(model, path)
    layer.w_p.set_value(jnp.full(layer.w_p.shape, 1.3) + (0.1 * jnp.arange(layer.w_p.size) if layer.w_p.ndim else 0))
    layer.w_n.set_value(jnp.full(layer.w_n.shape, 0.6))
  return model


def _by_hand(model):
  """The plain Net holding each ternary layer's kernel ternarized in numpy: +w_p above 0.05 max|w|, -w_n below minus it."""
  plain = nnx.clone(Net(nnx.Rngs(0)))
  for path in TERNARY:
    layer, target = _layer(model, path), _layer(plain, path)
    w = np.asarray(layer.kernel[...])
    delta = 0.05 * np.abs(w).max()
    shape = layer.ttq_scale_shape or ()
    w_p, w_n = np.reshape(np.asarray(layer.w_p[...]), shape), np.reshape(np.asarray(layer.w_n[...]), shape)
    target.kernel.set_value(jnp.asarray(np.where(w > delta, w_p, np.where(w < -delta, -w_n, 0.0)), jnp.float32))
  for path in ('stem', 'head') + TERNARY:
    layer, target = _layer(model, path), _layer(plain, path)
    if path in ('stem', 'head'):
      target.kernel.set_value(layer.kernel[...])
    if getattr(layer, 'bias', None) is not None:
      target.bias.set_value(layer.bias[...])
  return plain


def test_scales_are_params_beside_the_kernels_and_the_given_model_is_unchanged():
  net = Net(nnx.Rngs(0))
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # every rule selects a layer: no warning
    model = quant.quantize(net, RULES)
  assert type(net.conv) is nnx.Conv and not hasattr(net.conv, 'w_p')  # the given model: as it was
  assert [layer.path for layer in quant.ternary_layers(model)] == sorted(TERNARY)
  params = quant.nnx_rules.params(model)
  assert set(params['conv']) == {'kernel', 'bias', 'w_p', 'w_n'} and params['conv']['w_p'].shape == (4,)
  assert params['blocks']['0']['up']['w_n'].shape == () and params['mix']['w_p'].shape == ()
  assert set(params['stem']) == {'kernel', 'bias'} and set(params['head']) == {'kernel', 'bias'}
  assert float(params['blocks']['1']['down']['w_p']) == 1.0  # TTQ's own init: w_p_init
  np.testing.assert_array_equal(params['conv']['kernel'], nnx.state(net, nnx.Param)['conv']['kernel'][...])
  assert _layer(model, 'conv').ttq_scale_shape == (1, 1, 1, 4)


def test_forward_equals_the_plain_model_with_hand_ternarized_kernels():
  model = _with_distinct_scales(quant.quantize(Net(nnx.Rngs(0)), RULES))
  np.testing.assert_allclose(model(X), _by_hand(model)(X), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, X), model(X), rtol=1e-5, atol=1e-6)
  weights = quant.ternary_weights(quant.nnx_rules.params(model), quant.ternary_layers(model))
  np.testing.assert_array_equal(weights['conv/kernel'].dense(), _layer(_by_hand(model), 'conv').kernel[...])


def test_ttq_gradients_are_the_papers_through_nnx_grad():
  """dW_p = sum of dL/dWt over w > delta, dW_n = -sum over w < -delta, dw = w_p g / g / w_n g by set (per channel
  on the conv), where dL/dWt is the plain model's kernel gradient at the ternary kernels."""
  model = _with_distinct_scales(quant.quantize(Net(nnx.Rngs(0)), RULES))
  g_out = jax.random.normal(jax.random.PRNGKey(2), (2, 3))
  grads = nnx.grad(lambda m: jnp.sum(m(X) * g_out))(model)
  plain_grads = nnx.grad(lambda m: jnp.sum(m(X) * g_out))(_by_hand(model))
  for path in TERNARY:
    layer = _layer(model, path)
    g, mine = _state_at(plain_grads, path)['kernel'][...], _state_at(grads, path)
    w = np.asarray(layer.kernel[...])
    delta = 0.05 * np.abs(w).max()
    pos, neg = w > delta, w < -delta
    shape = layer.ttq_scale_shape or ()
    w_p, w_n = np.reshape(layer.w_p[...], shape), np.reshape(layer.w_n[...], shape)
    axes = tuple(i for i, s in enumerate(shape) if s == 1) if shape else None
    np.testing.assert_allclose(mine['w_p'][...], np.sum(np.where(pos, g, 0), axis=axes).reshape(layer.w_p.shape),
                               rtol=1e-4, atol=1e-6, err_msg=path)
    np.testing.assert_allclose(mine['w_n'][...], -np.sum(np.where(neg, g, 0), axis=axes).reshape(layer.w_n.shape),
                               rtol=1e-4, atol=1e-6, err_msg=path)
    np.testing.assert_allclose(mine['kernel'][...], np.where(pos, w_p * g, np.where(neg, w_n * g, g)),
                               rtol=1e-4, atol=1e-6, err_msg=path)


def test_paretoq_and_int8_inputs_use_the_method_kernels():
  model = quant.quantize(Net(nnx.Rngs(0)), [Rule(module_path='blocks/0/up', method='paretoq', scale_granularity='channel'),
                                            Rule(module_path='blocks/1/up', method='bitnet', activations='int8')])
  up = _layer(model, 'blocks/0/up')
  np.testing.assert_array_equal(up.alpha[...], np.abs(np.asarray(up.kernel[...])).max(axis=0))  # max |w| per output
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 4))
  expected = x @ quant.paretoq_ternarize(up.kernel[...], up.alpha[...].reshape(1, -1)) + up.bias[...]
  np.testing.assert_allclose(up(x), expected, rtol=1e-5, atol=1e-6)
  bit = _layer(model, 'blocks/1/up')
  scale = 127.0 / np.abs(np.asarray(x)).max(axis=1, keepdims=True)
  x8 = np.clip(np.round(np.asarray(x) * scale), -128, 127) / scale
  np.testing.assert_allclose(bit(x), x8 @ quant.bitnet_ternarize(bit.kernel[...]) + bit.bias[...], rtol=1e-5, atol=1e-6)
  assert [(layer.path, layer.quant.method) for layer in quant.ternary_layers(model)] == [
      ('blocks/0/up', 'paretoq'), ('blocks/1/up', 'bitnet')]


class _WithEmbed(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(5, 4, rngs=rngs)
    self.out = nnx.Linear(4, 2, rngs=rngs)


class _Custom(nnx.Module):
  def __init__(self, rngs):
    self.kernel = nnx.Param(jnp.ones((3, 2)))


class _WithCustom(nnx.Module):
  def __init__(self, rngs):
    self.special = _Custom(rngs)


def test_refusals_and_the_unused_rule_warning():
  with pytest.raises(ValueError, match=re.escape("selects the nnx.Embed at 'embed': embedding tables cannot be ternary")):
    quant.quantize(_WithEmbed(nnx.Rngs(0)), [Rule()])
  quant.quantize(_WithEmbed(nnx.Rngs(0)), [Rule(module_path='embed', method='fp'), Rule(module_path='out')])
  with pytest.raises(ValueError, match=re.escape("selects _Custom at 'special', a layer with a kernel that cannot be "
                                                 'made ternary: allowed are nnx.Linear')):
    quant.quantize(_WithCustom(nnx.Rngs(0)), [Rule(module_path='special')])
  with pytest.warns(UserWarning, match=r"rules that selected no layer: 'nothing' \(the model's layer paths: embed, out\)"):
    quant.quantize(_WithEmbed(nnx.Rngs(0)), [Rule(module_path='nothing'), Rule(module_path='out')])
