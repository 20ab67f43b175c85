"""Reporting helpers over a params tree: ternary kernels, per-layer sparsity, scales, counts.

A layer is ternary when its module name starts with `Ternary` (Flax's auto-name of `TernaryConv` /
`TernaryDense`) and the method is not 'fp'. Paths are slash-joined Flax paths, e.g.
`TernaryConv_1/kernel` for a params tree (prefix `params/` for a full variables tree).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ttq_jax.quant.config import QuantConfig
from ttq_jax.quant.weights import TernaryWeights


def is_ternary_layer(name: str) -> bool:
  """Whether a params-tree module name is a ternary layer (Flax auto-names `TernaryConv_3`, ...)."""
  return name.startswith('Ternary')


def _ternary_modules(params: Mapping[str, Any], prefix: str = ''):
  """Yields (path, module_dict) of ternary layers in a nested params dict (depth first, sorted)."""
  for name in sorted(params):
    value = params[name]
    if not isinstance(value, Mapping):
      continue
    path = f'{prefix}{name}'
    if is_ternary_layer(name) and 'kernel' in value and not isinstance(value['kernel'], Mapping):
      yield path, value
    else:
      yield from _ternary_modules(value, path + '/')


def ternary_weights(params: Mapping[str, Any], quant: QuantConfig) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
  """{kernel path: (codes int8 in {-1, 0, +1}, w_p, w_n)} for every ternary layer (`TernaryWeights`).

  The ternary kernel is `where(codes > 0, w_p, where(codes < 0, -w_n, 0))`.
  """
  if not quant.quantized:
    return {}
  out = {}
  for path, module in _ternary_modules(params):
    tw = TernaryWeights.from_latent(module['kernel'], module.get('w_p'), module.get('w_n'), quant)
    out[f'{path}/kernel'] = (tw.codes, tw.w_p, tw.w_n)
  return out


def ternary_kernels(params: Mapping[str, Any], quant: QuantConfig) -> dict[str, jax.Array]:
  """{kernel path: dense ternary kernel (float32)} as used in the forward pass."""
  return {p: jnp.where(c > 0, w_p, jnp.where(c < 0, -w_n, 0.0)).astype(jnp.float32)
          for p, (c, w_p, w_n) in ternary_weights(params, quant).items()}


def layer_sparsity(params: Mapping[str, Any], quant: QuantConfig) -> dict[str, float]:
  """{kernel path: fraction of zeros in the ternary kernel}."""
  return {p: float(jnp.mean(c == 0)) for p, (c, _, _) in ternary_weights(params, quant).items()}


def layer_scales(params: Mapping[str, Any], quant: QuantConfig) -> dict[str, tuple[float, float]]:
  """{kernel path: (w_p, w_n)} as used in the forward pass (TWN: its computed alpha twice)."""
  return {p: (float(w_p), float(w_n)) for p, (_, w_p, w_n) in ternary_weights(params, quant).items()}


def count_params(params: Mapping[str, Any], quant: QuantConfig) -> dict[str, int]:
  """{'ternary': #weights stored as ternary codes, 'full_precision': #other parameters}."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  ternary = 0
  if quant.quantized:
    for _, module in _ternary_modules(params):
      ternary += int(np.prod(module['kernel'].shape))
  return {'ternary': ternary, 'full_precision': total - ternary}
