"""Export file format: pinned bit order, round trips for both packings, bad files, size ratios."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from ttq_jax import export_format
from ttq_jax import models
from ttq_jax.quant import QuantConfig

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
  assert export_format.pack(np.array(codes), packing).tolist() == packed
  assert export_format.unpack(np.array(packed, np.uint8), len(codes), packing).tolist() == codes


def test_dense_from_codes_meaning():
  np.testing.assert_array_equal(export_format.dense_from_codes(np.array([0, 1, 2, 1]), (2, 2), 0.5, 0.25),
                                [[0.0, 0.5], [-0.25, 0.5]])


@pytest.mark.parametrize('packing', ['2bit', 'base3'])
def test_random_codes_round_trip(packing):
  codes = np.random.default_rng(0).integers(0, 3, 1001).astype(np.uint8)
  np.testing.assert_array_equal(export_format.unpack(export_format.pack(codes, packing), 1001, packing), codes)


@pytest.mark.parametrize('data,n,packing,msg', [
    ([0b11], 1, '2bit', 'invalid code 3'),
    ([243], 5, 'base3', 'byte 243 > 242'),
    ([1, 2], 3, '2bit', '2 bytes do not hold 3 elements'),
    ([1 << 2], 1, '2bit', 'padding elements after element 1 are not 0'),
])
def test_invalid_packed_data(data, n, packing, msg):
  with pytest.raises(export_format.ExportError, match=msg):
    export_format.unpack(np.array(data, np.uint8), n, packing, name='t')


def ttq_variables(name='resnet_tiny', shape=(2, 28, 28, 1)):
  model = models.create_model(name, num_classes=10, quant=TTQ)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
  # non-trivial scales and BN statistics
  variables = jax.tree_util.tree_map_with_path(
      lambda p, v: v * 0.37 + 0.1 if p[-1].key in ('w_p', 'mean') else (v * 1.7 if p[-1].key in ('w_n', 'var') else v),
      variables)
  return model, variables


def write_export(tmp_path, packing, variables):
  from configs import fashion_mnist
  config = fashion_mnist.get_config('smoke')
  path = str(tmp_path / f'model_{packing}.safetensors')
  tensors = export_format.build_export(variables['params'], variables['batch_stats'], TTQ, packing)
  export_format.save(path, tensors, packing=packing, config=config, step=6)
  return path


def _rewrite(path, mutate):
  from safetensors import safe_open
  with safe_open(path, framework='numpy') as f:
    metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
  mutate(metadata, tensors)
  save_file(tensors, path, metadata=metadata)


K = 'params/PreActBlock_1/TernaryConv_0/kernel'


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
  tensors = export_format.build_export(variables['params'], variables['batch_stats'], TTQ, packing)
  ternary_fp32 = 267_264 * 4
  packed = sum(v.nbytes for k, v in tensors.items() if k.endswith(export_format.SUFFIXES))
  assert ternary_fp32 / packed >= goal
  total_fp32 = sum(x.size * 4 for x in jax.tree.leaves(variables))
  assert total_fp32 / sum(v.nbytes for v in tensors.values()) > 10  # FP stem/head/BN included
