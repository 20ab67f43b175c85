"""BitNet b1.58 (Ma et al. 2024) as a method of the table: absmean ternary weights, 8-bit absmax activations as
a rule field, by hand-computed values, on every kind of layer a rule can select; export and reload."""

import dataclasses
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import quant
from ttq_jax.quant import QuantConfig, Rule, TernaryWeights

BITNET = QuantConfig(method='bitnet')

# mean|W| = 1.25 / 6 -> s = 4.8; W * s = [1.44, -0.24, 0.96, -2.88, 0, 0.48] -> round, clip: [1, 0, 1, -1, 0, 0]
W = jnp.float32([0.3, -0.05, 0.2, -0.6, 0.0, 0.1])
W_CODES = [1, 0, 1, -1, 0, 0]
W_ALPHA = 1.25 / 6
G = jnp.float32([0.5, -1.0, 2.0, 0.25, -3.0, 1.5])


def test_weights_by_hand():
  out, grad = jax.value_and_grad(lambda w: jnp.sum(quant.bitnet_ternarize(w) * G))(W)
  np.testing.assert_allclose(quant.bitnet_ternarize(W), np.float32(W_CODES) * W_ALPHA, rtol=1e-6)
  np.testing.assert_array_equal(grad, G)  # straight through: the whole residual is held constant
  tw = TernaryWeights.from_latent(W, None, BITNET)
  np.testing.assert_array_equal(tw.codes, W_CODES)
  assert float(tw.w_p) == float(tw.w_n) == pytest.approx(W_ALPHA, rel=1e-6)
  np.testing.assert_array_equal(tw.dense(), quant.bitnet_ternarize(W))  # exported == computed, bit for bit
  assert float(BITNET.delta(W)) == pytest.approx(0.5 * W_ALPHA, rel=1e-6)  # the table's threshold: 0.5 mean|w|
  assert BITNET.threshold_rule == 'absmean' and not BITNET.spec.trained_scales


def test_weight_ties_round_half_to_even_and_zero_tensor():
  """mean|w| = 1 so s = 1: 0.5 and -0.5 round to 0 (half to even, as torch.round), 1.5 to 2 then clips to 1."""
  w = jnp.float32([0.5, 1.5, -0.5, -2.0, 0.5])
  np.testing.assert_array_equal(quant.bitnet_ternarize(w), [0.0, 1.0, 0.0, -1.0, 0.0])
  zero = jnp.zeros((3, 2))
  np.testing.assert_array_equal(quant.bitnet_ternarize(zero), zero)  # s = 1 / 1e-5: no NaN
  np.testing.assert_array_equal(jax.grad(lambda w: jnp.sum(quant.bitnet_ternarize(w) * 2.0))(zero), 2.0 * np.ones((3, 2)))
  np.testing.assert_array_equal(TernaryWeights.from_latent(zero, None, BITNET).codes, np.zeros((3, 2)))


def test_per_channel_scale_is_one_per_output_feature():
  """Column means 2 and 0.2: s = 0.5 and 5; w * s = [[0.5, 0.5], [1.5, 1.5]] -> [[0, 0], [1, 1]]."""
  w = jnp.float32([[1.0, 0.1], [3.0, 0.3]])
  np.testing.assert_allclose(quant.bitnet_ternarize(w, axes=(0,)), [[0.0, 0.0], [2.0, 0.2]], rtol=1e-6)
  layer = quant.quantize(nn.Dense(2, use_bias=False), [Rule(method='bitnet', scale_granularity='channel')])
  x = jnp.float32([[1.0, 1.0]])
  np.testing.assert_allclose(layer.apply({'params': {'kernel': w}}, x), [[2.0, 0.2]], rtol=1e-6)
  layers = quant.ternary_layers(layer, x)
  tw = quant.ternary_weights({'kernel': w}, layers)['kernel']
  np.testing.assert_allclose(np.ravel(tw.w_p), [2.0, 0.2], rtol=1e-6)
  np.testing.assert_array_equal(tw.codes, [[0, 0], [1, 1]])


def test_bfloat16_decides_in_float32():
  w = jax.random.normal(jax.random.PRNGKey(0), (64,)) * 0.1
  np.testing.assert_array_equal(quant.bitnet_ternarize(w.astype(jnp.bfloat16)),
                                quant.bitnet_ternarize(w.astype(jnp.bfloat16).astype(jnp.float32)).astype(jnp.bfloat16))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 16))
  xb = x.astype(jnp.bfloat16)
  np.testing.assert_array_equal(quant.absmax_int8(xb, (1,)), quant.absmax_int8(xb.astype(jnp.float32), (1,)).astype(jnp.bfloat16))


def test_activations_by_hand():
  """Row 0: max|x| = 127, s = 1: 62.5 -> 62 and -0.5 -> 0 (half to even), 1.5 -> 2. Row 1: an all-zero token stays 0.
  Row 2: max 2, s = 63.5: 1 * 63.5 = 63.5 -> 64, so 1 -> 64 / 63.5."""
  x = jnp.float32([[127.0, 62.5, -0.5, 1.5], [0.0, 0.0, 0.0, 0.0], [2.0, 1.0, -2.0, 0.0]])
  expected = np.float32([[127, 62, 0, 2], [0, 0, 0, 0], [127 / 63.5, 64 / 63.5, -127 / 63.5, 0]])
  np.testing.assert_allclose(quant.absmax_int8(x, (1,)), expected, rtol=1e-6)
  g = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(quant.absmax_int8(x, (1,)) * g))(x), g)


# --------------------------------------------------------------------------- every kind of layer


def _ref_weight(w, out_axes):
  """numpy BitNet weights, per tensor."""
  del out_axes
  w = np.asarray(w, np.float32)
  s = np.float32(1) / max(np.float32(np.mean(np.abs(w))), np.float32(1e-5))
  return np.clip(np.round(w * s), -1, 1) / s


def _ref_act(x, axes):
  x = np.asarray(x, np.float32)
  s = np.float32(127) / np.maximum(np.max(np.abs(x), axis=axes, keepdims=True), np.float32(1e-5))
  return np.clip(np.round(x * s), -128, 127) / s


LAYERS = {  # name: (plain layer, input shape, the input's contracted axes)
    'dense': (lambda: nn.Dense(3), (2, 5, 4), (2,)),
    'dense_general': (lambda: nn.DenseGeneral((2, 3), axis=(-2, -1)), (2, 4, 5), (1, 2)),
    'einsum': (lambda: nn.Einsum((4, 2, 3), 'btd,dhk->bthk'), (2, 3, 4), (2,)),
    'conv': (lambda: nn.Conv(3, (3, 3)), (2, 5, 5, 4), (3,)),
    'conv_transpose': (lambda: nn.ConvTranspose(3, (3, 3), strides=(2, 2)), (2, 4, 4, 4), (3,)),
}


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_w158a8_on_every_layer_kind(name):
  make, shape, axes = LAYERS[name]
  plain = make()
  layer = quant.quantize(make(), [Rule(method='bitnet', activations='int8')])
  x = jax.random.normal(jax.random.PRNGKey(0), shape).at[0].set(0.0)  # an all-zero example (tokens / pixels)
  variables = layer.init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(variables) == jax.tree.structure(plain.init(jax.random.PRNGKey(1), x))  # no w_p / w_n
  kernel = variables['params']['kernel']
  wq, xq = _ref_weight(kernel, None), _ref_act(x, axes)
  ref_vars = {'params': dict(variables['params'], kernel=jnp.asarray(wq))}
  # straight through: the gradients are the plain layer's at (quantized input, quantized kernel)
  def value_and_grads(m, params, x):  # one compiled program per model (op-by-op dispatch is slow on CPU)
    g = jax.random.normal(jax.random.PRNGKey(2), jax.eval_shape(m.apply, {'params': params}, x).shape)
    loss = lambda params, x: jnp.sum(m.apply({'params': params}, x) * g)
    return jax.jit(lambda p, x: (m.apply({'params': p}, x), jax.grad(loss, argnums=(0, 1))(p, x)))(params, x)
  out, (dp, dx) = value_and_grads(layer, variables['params'], x)
  ref, (rp, rx) = value_and_grads(plain, ref_vars['params'], jnp.asarray(xq))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dp['kernel'], rp['kernel'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-5)


def test_int8_with_ttq_and_fp_and_an_embedding_refused(tmp_path):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4))
  fp = quant.quantize(nn.Dense(3), [Rule(method='fp', activations='int8')])
  v = fp.init(jax.random.PRNGKey(1), x)
  np.testing.assert_allclose(fp.apply(v, x), nn.Dense(3).apply(v, jnp.asarray(_ref_act(x, (1,)))), rtol=1e-6)
  np.testing.assert_array_equal(fp.apply(v, inputs=x), fp.apply(v, x))  # the input given by keyword too
  ttq = quant.quantize(nn.Dense(3), [Rule(activations='int8')])
  tv = flax.core.unfreeze(ttq.init(jax.random.PRNGKey(1), x))
  assert set(tv['params']) == {'kernel', 'bias', 'w_p', 'w_n'}
  assert quant.activation_modes(ttq, x) == {'': 'int8'} and quant.activation_modes(nn.Dense(3), x) == {}
  # TTQ + int8 by value: the int8 input (absmax per row) times TTQ's kernel with distinct w_p / w_n
  tv['params']['w_p'], tv['params']['w_n'] = jnp.float32(1.5), jnp.float32(0.5)
  kernel = np.asarray(tv['params']['kernel'])
  delta = 0.05 * np.abs(kernel).max()
  by_hand = np.where(kernel > delta, 1.5, np.where(kernel < -delta, -0.5, 0.0))
  expected = _ref_act(x, (1,)) @ by_hand + np.asarray(tv['params']['bias'])
  np.testing.assert_allclose(ttq.apply(tv, x), expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(x) @ by_hand + np.asarray(tv['params']['bias']), expected, atol=1e-4)  # int8 shows
  # its export: the dense TTQ kernel, the input quantized again on reload
  from ttq_jax import export, export_format
  path = os.path.join(tmp_path, 'ttq_a8.safetensors')
  export_format.save(path, export_format.build_export(tv['params'], {}, quant.ternary_layers(ttq, x), '2bit'),
                     packing='2bit', config={}, step=1, activations=quant.activation_modes(ttq, x))
  plain, loaded = export.load(path, model=ttq)
  np.testing.assert_array_equal(loaded['params']['kernel'], by_hand.astype(np.float32))
  np.testing.assert_allclose(plain.apply(loaded, x), expected, rtol=1e-5, atol=1e-6)
  embed = quant.quantize(nn.Embed(5, 3), [Rule(method='fp', activations='int8')])
  with pytest.raises(ValueError, match='selects the nn.Embed'):
    embed.init(jax.random.PRNGKey(0), jnp.zeros((2,), jnp.int32))


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3), name='conv')(x))
    return nn.Dense(3, name='head')(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize('activations', ['float', 'int8'])
def test_export_and_reload_give_the_same_logits(tmp_path, activations):
  from ttq_jax import export
  from ttq_jax import export_format
  rules = [Rule(module_path='conv', method='bitnet', activations=activations), Rule(module_path='head', method='fp',
                                                                                     activations=activations)]
  model = quant.quantize(_Net(), rules)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 2))
  variables = model.init(jax.random.PRNGKey(1), x)
  layers = quant.ternary_layers(model, x)
  tensors = export_format.build_export(variables['params'], {}, layers, '2bit')
  path = str(tmp_path / 'm.safetensors')
  modes = quant.activation_modes(model, x)
  assert modes == ({} if activations == 'float' else {'conv': 'int8', 'head': 'int8'})
  export_format.save(path, tensors, packing='2bit', config={'quant': dataclasses.asdict(BITNET)}, step=1,
                     activations=modes)
  loaded_model, loaded = export.load(path, model=model)
  np.testing.assert_array_equal(loaded_model.apply(loaded, x), model.apply(variables, x))
  _, metadata, report = export_format.read(path)
  assert ('activations' in metadata) == (activations == 'int8') and set(report) == {'params/conv/kernel'}
