"""sharding directly: mesh shapes and the FSDP parameter rule by value, batch-size checks, global batches
(tests run with 8 simulated CPU devices, conftest)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ttq_jax import sharding
from ttq_jax.errors import ConfigError


@pytest.mark.parametrize('shape,expected', [((-1, 1), {'data': 8, 'fsdp': 1}), ((2, -1), {'data': 2, 'fsdp': 4}),
                                            ((4, 2), {'data': 4, 'fsdp': 2}), ((2, 1), {'data': 2, 'fsdp': 1})])
def test_mesh_shapes(shape, expected):
  assert dict(sharding.create_mesh(shape, ('data', 'fsdp')).shape) == expected


@pytest.mark.parametrize('shape,message', [((3, -1), 'does not fit 8 devices'), ((-1, -1), 'at most one -1'),
                                           ((2,), 'differ in length')])
def test_bad_mesh_shapes_are_one_line(shape, message):
  with pytest.raises(ConfigError, match=message):
    sharding.create_mesh(shape, ('data', 'fsdp'))


@pytest.mark.parametrize('param_shape,mesh_shape,spec', [
    ((3, 3, 64, 64), (2, 4), P()),                               # 36,864 values: below FSDP_MIN_SIZE, replicated
    ((1024, 512), (2, 4), P('fsdp', None)),                      # the largest dimension divisible by 4
    ((512, 1024), (2, 4), P(None, 'fsdp')),
    ((1022, 512), (2, 4), P(None, 'fsdp')),                      # largest not divisible: the next one
    ((1023, 511), (2, 4), P()),                                  # none divisible
    ((1024, 512), (8, 1), P()),                                  # no fsdp axis: replicated
])
def test_param_spec_by_value(param_shape, mesh_shape, spec):
  mesh = sharding.create_mesh(mesh_shape, ('data', 'fsdp'))
  assert sharding.param_spec(param_shape, mesh) == spec


def test_batch_size_must_divide_over_the_devices():
  mesh = sharding.create_mesh((-1, 1), ('data', 'fsdp'))
  sharding.check_batch_size(64, mesh)
  with pytest.raises(ConfigError, match='batch_size=30 is not divisible by the 8 devices'):
    sharding.check_batch_size(30, mesh)


def test_global_batch_is_sharded_over_every_batch_axis_and_keeps_the_rows():
  mesh = sharding.create_mesh((2, 4), ('data', 'fsdp'))
  local = {'image': np.arange(16 * 3, dtype=np.float32).reshape(16, 3), 'label': np.arange(16, dtype=np.int32)}
  batch = sharding.global_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(batch['image']), local['image'])
  assert batch['image'].sharding.spec == P(('data', 'fsdp'))
  assert {s.data.shape for s in batch['label'].addressable_shards} == {(2,)}  # 16 rows over 8 devices
  assert len(jax.devices()) == 8
