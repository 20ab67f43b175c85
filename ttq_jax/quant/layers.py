"""Flax linen layers that own a latent kernel and its TTQ scales and call the pure quantizer.

With `QuantConfig(method='fp')` a layer computes exactly what `nn.Conv` / `nn.Dense` compute.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ttq_jax.quant import _ternary
from ttq_jax.quant.config import QuantConfig
from ttq_jax.quant.weights import effective_scales, threshold

Dtype = Any
Initializer = Callable[..., jax.Array]

FP = QuantConfig(method='fp')


def quantize_kernel(kernel: jax.Array, w_p: jax.Array | None, w_n: jax.Array | None,
                    quant: QuantConfig) -> jax.Array:
  """Kernel as used in the forward pass: ternary for 'ttq'/'twn', unchanged for 'fp'."""
  if quant.method == 'fp':
    return kernel
  if quant.method == 'twn':
    return _ternary.twn_ternarize(kernel, threshold(kernel.astype(jnp.float32), quant))
  w_p, w_n = effective_scales(w_p, w_n, quant)
  return _ternary.ternarize(kernel, w_p, w_n, threshold(kernel, quant))


class _TernaryKernelMixin:
  """Creates `kernel` (+ `w_p`, `w_n` for TTQ) and returns the kernel to compute with."""

  def _kernel(self, shape, kernel_init, param_dtype, dtype):
    quant: QuantConfig = self.quant
    kernel = self.param('kernel', kernel_init, shape, param_dtype)
    w_p = w_n = None
    if quant.method == 'ttq':
      w_p = self.param('w_p', nn.initializers.constant(quant.w_p_init), (), param_dtype)
      w_n = self.param('w_n', nn.initializers.constant(quant.w_n_init), (), param_dtype)
    # Decide the codes on the float32 latent kernel (as reports and export do: `TernaryWeights`), then
    # compute in `dtype`: a bf16 ternary kernel holds w_p / w_n rounded once.
    return quantize_kernel(kernel, w_p, w_n, quant).astype(dtype)


class TernaryDense(nn.Module, _TernaryKernelMixin):
  """Dense layer with a TTQ / TWN / full-precision kernel (same params as `nn.Dense` + scales)."""

  features: int
  quant: QuantConfig = FP
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    kernel = self._kernel((x.shape[-1], self.features), self.kernel_init, self.param_dtype, dtype)
    y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


class TernaryConv(nn.Module, _TernaryKernelMixin):
  """2-D NHWC convolution with a TTQ / TWN / full-precision kernel (HWIO, like `nn.Conv`)."""

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: str | Sequence[tuple[int, int]] = 'SAME'
  feature_group_count: int = 1
  quant: QuantConfig = FP
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    kernel_size = tuple(self.kernel_size)
    strides = (self.strides,) * len(kernel_size) if isinstance(self.strides, int) else tuple(self.strides)
    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(f'input features {in_features} not divisible by feature_group_count={self.feature_group_count}')
    shape = kernel_size + (in_features // self.feature_group_count, self.features)
    kernel = self._kernel(shape, self.kernel_init, self.param_dtype, dtype)
    padding = self.padding if isinstance(self.padding, str) else tuple(tuple(p) for p in self.padding)
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), kernel, window_strides=strides, padding=padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=self.feature_group_count)
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y
