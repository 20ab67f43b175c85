"""`TernaryWeights`: the one value type of a ternary kernel (codes + two scales), with its conversions.

    TernaryWeights.from_latent(kernel, scales, quant)     # the forward pass's decision, in float32
    weights.dense()                                        # the kernel the forward pass computes with
    weights.pack('2bit') / TernaryWeights.unpack(...)      # bytes for export (ttq_jax.quant.packing)

Codes are decided by the method's entry of `METHODS` on the float32 latent kernel, with the same functions
its forward kernel uses (`_ternary.ternary_masks` for ttq / twn, `bitnet_codes` for bitnet, `paretoq_codes` for
paretoq), so what is
reported and exported is what the network computed with, also when the model computes in bfloat16.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ttq_jax.quant import packing as packing_lib
from ttq_jax.quant.config import QuantConfig


def threshold(kernel: jax.Array, quant: QuantConfig) -> jax.Array:
  """The layer's delta under its config (the rule `quant.threshold_rule`; no gradient)."""
  return quant.delta(kernel)


@flax.struct.dataclass
class TernaryWeights:
  """codes: int8 in {-1, 0, +1} of the kernel's shape; w_p / w_n: float32 scales, scalar (per tensor) or
  broadcastable to the codes (per output channel). The kernel is where(codes > 0, w_p, where(codes < 0, -w_n, 0))."""
  codes: jax.Array
  w_p: jax.Array
  w_n: jax.Array

  @classmethod
  def from_latent(cls, kernel: jax.Array, scales: Mapping[str, jax.Array] | None, quant: QuantConfig,
                  scale_shape=()) -> 'TernaryWeights':
    """The ternary weights a latent kernel stands for under `quant`: the codes and scales of its method
    (`METHODS[quant.method].weights`: 'ttq' the trained w_p / w_n; 'twn' and 'bitnet' their computed scale
    twice; 'paretoq' 2a / 3 twice), with the threshold rule in force. Decisions are taken in float32.
    `scales`: {name: value} of the method's trained scales (None or {} for methods without);
    `scale_shape`: their broadcast shape against the kernel (() per tensor)."""
    codes, w_p, w_n = quant.spec.weights(jnp.asarray(kernel, jnp.float32), dict(scales or {}), quant, scale_shape)
    return cls(codes, w_p, w_n)

  def dense(self, dtype: Any = jnp.float32) -> jax.Array:
    """The kernel as the forward pass uses it (scales rounded once to `dtype`)."""
    w_p, w_n = jnp.asarray(self.w_p, dtype), jnp.asarray(self.w_n, dtype)
    return jnp.where(self.codes > 0, w_p, jnp.where(self.codes < 0, -w_n, jnp.zeros((), dtype)))

  @property
  def sparsity(self) -> float:
    return float(np.mean(np.asarray(self.codes) == 0))

  def pack(self, packing: str) -> np.ndarray:
    """The codes as bytes (`ttq_jax.quant.packing.PACKINGS[packing]`, C order)."""
    return packing_lib.pack(packing_lib.codes_from_ternary(np.asarray(self.codes)), packing)

  @classmethod
  def unpack(cls, data: np.ndarray, shape, w_p, w_n, packing: str, name: str = 'codes') -> 'TernaryWeights':
    """Inverse of `pack` (validating the bytes); `w_p` / `w_n` as stored beside them."""
    codes = packing_lib.unpack(data, int(np.prod(shape)), packing, name)
    signs = np.where(codes == 1, 1, np.where(codes == 2, -1, 0)).astype(np.int8).reshape(tuple(shape))
    return cls(jnp.asarray(signs), jnp.asarray(w_p, jnp.float32), jnp.asarray(w_n, jnp.float32))
