"""TernaryWeights: the codes the forward pass uses, the dense kernel, and packed bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import quant
from ttq_jax.quant import QuantConfig, TernaryWeights

KERNEL = jnp.array([[-2.0, -0.5, -0.05], [0.0, 0.05, 0.3], [1.0, -0.12, 0.11]], jnp.float32)  # delta = 0.1


def test_codes_and_dense_are_the_forward_quantizer():
  w_p, w_n = jnp.float32(1.5), jnp.float32(0.5)
  tw = TernaryWeights.from_latent(KERNEL, {'w_p': w_p, 'w_n': w_n}, QuantConfig())
  np.testing.assert_array_equal(tw.codes, [[-1, -1, 0], [0, 0, 1], [1, -1, 1]])
  assert tw.codes.dtype == jnp.int8 and tw.sparsity == pytest.approx(3 / 9)
  np.testing.assert_array_equal(tw.dense(), quant.ternarize(KERNEL, w_p, w_n, quant.delta_from_max(KERNEL, 0.05)))


def test_per_channel_scales_and_positive_scales():
  w_p, w_n = jnp.array([[1.0, -2.0, 3.0]]), jnp.array([[0.5, 0.25, -4.0]])
  tw = TernaryWeights.from_latent(KERNEL, {'w_p': w_p, 'w_n': w_n}, QuantConfig(positive_scales=True))
  np.testing.assert_array_equal(tw.dense(), [[-0.5, -0.25, 0.0], [0.0, 0.0, 3.0], [1.0, -0.25, 3.0]])


def test_twn_uses_its_computed_alpha():
  tw = TernaryWeights.from_latent(KERNEL, None, QuantConfig(method='twn'))
  np.testing.assert_allclose(tw.dense(), quant.twn_ternarize(KERNEL), rtol=1e-6)
  with pytest.raises(ValueError, match="quant.method='fp' has no ternary weights"):
    TernaryWeights.from_latent(KERNEL, None, QuantConfig(method='fp'))


@pytest.mark.parametrize('packing', ['2bit', 'base3'])
def test_pack_unpack_round_trip(packing):
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 5, 7))
  tw = TernaryWeights.from_latent(kernel, {'w_p': jnp.float32(0.7), 'w_n': jnp.float32(1.3)}, QuantConfig(t=0.2))
  data = tw.pack(packing)
  assert data.dtype == np.uint8 and data.size == -(-kernel.size // {'2bit': 4, 'base3': 5}[packing])
  back = TernaryWeights.unpack(data, kernel.shape, tw.w_p, tw.w_n, packing)
  np.testing.assert_array_equal(back.codes, tw.codes)
  np.testing.assert_array_equal(back.dense(), tw.dense())


def test_dense_in_bfloat16_rounds_the_scales_once():
  tw = TernaryWeights.from_latent(KERNEL, {'w_p': jnp.float32(1.0 / 3.0), 'w_n': jnp.float32(0.5)}, QuantConfig())
  dense = tw.dense(jnp.bfloat16)
  assert dense.dtype == jnp.bfloat16 and float(dense[1, 2]) == float(jnp.bfloat16(1.0 / 3.0))
