"""Export file format: pinned bit order, round trips for both packings, bad files, size ratios."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ttq_jax import export_format
from ttq_jax import models
from ttq_jax import quant
from ttq_jax.quant import QuantConfig
from ttq_jax.quant import packing as packing_lib

TTQ = QuantConfig()


@pytest.mark.parametrize('packing,codes,packed', [
    # 2bit: element i at bits 2*(i % 4) of byte i // 4, least significant first
    ('2bit', [1, 2, 0, 1, 2], [1 | 2 << 2 | 0 << 4 | 1 << 6, 2]),
    ('2bit', [0, 0, 0, 2], [2 << 6]),
    # base3: byte = sum d_k * 3**k over 5 elements
    ('base3', [1, 2, 0, 1, 2, 1], [1 + 2 * 3 + 0 * 9 + 1 * 27 + 2 * 81, 1]),
    ('base3', [2, 2, 2, 2, 2], [242]),
])
def test_hand_packed_bytes(packing, codes, packed):
  assert packing_lib.pack(np.array(codes), packing).tolist() == packed
  assert packing_lib.unpack(np.array(packed, np.uint8), len(codes), packing).tolist() == codes


@pytest.mark.parametrize('packing', ['2bit', 'base3'])
def test_stored_codes_meaning(packing):
  """Stored code 0 -> 0, 1 -> +w_p, 2 -> -w_n (C order), decoded as `read` decodes: through TernaryWeights."""
  from ttq_jax.quant import TernaryWeights
  data = packing_lib.pack(np.array([0, 1, 2, 1]), packing)
  weights = TernaryWeights.unpack(data, (2, 2), 0.5, 0.25, packing)
  np.testing.assert_array_equal(weights.codes, [[0, 1], [-1, 1]])
  np.testing.assert_array_equal(weights.dense(), [[0.0, 0.5], [-0.25, 0.5]])


@pytest.mark.parametrize('packing', ['2bit', 'base3'])
def test_random_codes_round_trip(packing):
  codes = np.random.default_rng(0).integers(0, 3, 1001).astype(np.uint8)
  np.testing.assert_array_equal(packing_lib.unpack(packing_lib.pack(codes, packing), 1001, packing), codes)


@pytest.mark.parametrize('data,n,packing,msg', [
    ([0b11], 1, '2bit', 'invalid code 3'),
    ([243], 5, 'base3', 'byte 243 > 242'),
    ([1, 2], 3, '2bit', '2 bytes do not hold 3 elements'),
    ([1 << 2], 1, '2bit', 'padding elements after element 1 are not 0'),
])
def test_invalid_packed_data(data, n, packing, msg):
  with pytest.raises(export_format.ExportError, match=msg):
    packing_lib.unpack(np.array(data, np.uint8), n, packing, name='t')


def ttq_variables(name='resnet_tiny', shape=(2, 28, 28, 1)):
  model = models.create_model(name, num_classes=10, quant=TTQ)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
  # non-trivial scales and BN statistics
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 0.37 + 0.1 if p[-1].key in ('w_p', 'mean') else (v * 1.7 if p[-1].key in ('w_n', 'var') else v),
      variables)
  return model, variables


def layers_of(name='resnet_tiny', shape=(2, 28, 28, 1)):
  """The ternary layers of a built-in model, found in its module tree."""
  return quant.ternary_layers(models.create_model(name, num_classes=10, quant=TTQ), jnp.zeros(shape), train=False)


def write_export(tmp_path, packing, variables):
  from configs import fashion_mnist
  config = fashion_mnist.get_config('smoke')
  path = str(tmp_path / f'model_{packing}.safetensors')
  tensors = export_format.build_export(variables['params'], variables['batch_stats'], layers_of(), packing)
  export_format.save(path, tensors, packing=packing, config=config, step=6)
  return path


def _rewrite(path, mutate):
  from safetensors import safe_open
  with safe_open(path, framework='numpy') as f:
    metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
  mutate(metadata, tensors)
  save_file(tensors, path, metadata=metadata)


K = 'params/res2_0/conv1/kernel'


@pytest.mark.parametrize('mutate,msg', [
    (lambda m, t: m.update(format='ttq-v0'), "format='ttq-v0' is unknown"),
    (lambda m, t: m.update(packing='3bit'), "packing='3bit' is unknown"),
    (lambda m, t: t.update({K + '/codes': np.full_like(t[K + '/codes'], 255)}), f'{K}/codes: invalid code 3'),
    (lambda m, t: t.update({K + '/shape': np.array([3, 3, 4, 9], np.int64)}), f'{K}/codes: .* bytes do not hold 324'),
    (lambda m, t: t.pop(K + '/w_n'), f'tensor {K}/w_n is missing'),
])
def test_tampered_files_fail_in_one_line(tmp_path, mutate, msg):
  _, variables = ttq_variables()
  path = write_export(tmp_path, '2bit', variables)
  _rewrite(path, mutate)
  with pytest.raises(export_format.ExportError, match=msg) as e:
    export_format.read(path)
  assert '\n' not in str(e.value)


def test_truncated_file(tmp_path):
  _, variables = ttq_variables()
  path = write_export(tmp_path, 'base3', variables)
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(export_format.ExportError, match='not a readable safetensors file'):
    export_format.read(path)


def test_unknown_packing_writes_nothing(tmp_path):
  _, variables = ttq_variables()
  with pytest.raises(export_format.ExportError, match="export.packing='4bit' is unknown"):
    write_export(tmp_path, '4bit', variables)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('packing,goal', [('2bit', 15.0), ('base3', 19.0)])
def test_resnet20_size_ratios(packing, goal):
  model = models.create_model('resnet20', num_classes=10, quant=TTQ)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  tensors = export_format.build_export(variables['params'], variables['batch_stats'],
                                       layers_of('resnet20', (1, 32, 32, 3)), packing)
  ternary_fp32 = 267_264 * 4
  packed = sum(v.nbytes for k, v in tensors.items() if k.endswith(export_format.SUFFIXES))
  assert ternary_fp32 / packed >= goal
  total_fp32 = sum(x.size * 4 for x in jax.tree.leaves(variables))
  assert total_fp32 / sum(v.nbytes for v in tensors.values()) > 10  # FP stem/head/BN included


def test_per_channel_scales_round_trip(tmp_path):
  """Format v2: a quantize()d model with per-channel scales (DenseGeneral with two output axes, a conv)
  exports codes + one scale per output feature + `scale_shape`; reading rebuilds the kernels it computed with."""
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(6, (3, 3), name='conv')(x)
      return nn.DenseGeneral((2, 3), name='proj')(x.reshape(x.shape[0], -1))

  model = quant.quantize(Net(), [quant.Rule(module_path='conv|proj', scale_granularity='channel')])
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 5, 2))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v * jnp.linspace(0.5, 2.0, v.size).reshape(v.shape) if p[-1].key in ('w_p', 'w_n') else v, params)
  layers = quant.ternary_layers(model, x)
  assert [(l.path, l.scale_shape) for l in layers] == [('conv', (1, 1, 1, 6)), ('proj', (1, 2, 3))]
  path = str(tmp_path / 'm.safetensors')
  tensors = export_format.build_export(params, {}, layers, '2bit')
  assert tensors['params/proj/kernel/w_p'].shape == (6,) and tensors['params/proj/kernel/scale_shape'].tolist() == [1, 2, 3]
  export_format.save(path, tensors, packing='2bit', config={'model': {}}, step=1)
  variables, metadata, report = export_format.read(path)
  assert metadata['format'] == 'ttq-safetensors-v2' and report['params/conv/kernel']['per_channel']
  np.testing.assert_allclose(Net().apply(variables, x), model.apply({'params': params}, x), rtol=1e-6, atol=1e-6)
  from ttq_jax import export
  plain, loaded = export.load(path, model=model)  # a user model: pass it (quantized or not)
  assert type(plain) is Net
  np.testing.assert_allclose(plain.apply(loaded, x), model.apply({'params': params}, x), rtol=1e-6, atol=1e-6)


def test_v1_files_still_read_and_cannot_hold_per_channel_scales(tmp_path):
  _, variables = ttq_variables()
  path = write_export(tmp_path, '2bit', variables)
  _rewrite(path, lambda m, t: m.update(format='ttq-safetensors-v1'))
  v1, metadata, _ = export_format.read(path)  # files written before v2 (per-tensor scales)
  v2, _, _ = export_format.read(write_export(tmp_path / 'b', '2bit', variables))
  for x, y in zip(jax.tree.leaves(v1), jax.tree.leaves(v2)):
    np.testing.assert_array_equal(x, y)
  _rewrite(path, lambda m, t: t.update({K + '/scale_shape': np.array([1, 1, 1, 8], np.int64)}))
  with pytest.raises(export_format.ExportError, match='scale_shape .per-channel scales. needs format ttq-safetensors-v2'):
    export_format.read(path)
