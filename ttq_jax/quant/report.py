"""Reporting helpers over a params tree and the model's ternary layers (`ternary_layers`): codes,
per-layer sparsity, scales, parameter counts. Paths are slash-joined Flax paths of kernels, e.g.
`res2_0/conv1/kernel`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttq_jax.quant.methods import THRESHOLDS
from ttq_jax.quant.rules import TernaryLayer
from ttq_jax.quant.weights import TernaryWeights


def _get(tree: Mapping[str, Any], path: str) -> Mapping[str, Any]:
  for k in filter(None, path.split('/')):
    tree = tree[k]
  return tree


def ternary_weights(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, TernaryWeights]:
  """{kernel path: TernaryWeights} of every ternary layer (scales in their broadcast shape)."""
  out = {}
  for layer in layers:
    module = _get(params, layer.path)
    w_p, w_n = module.get('w_p'), module.get('w_n')
    if w_p is not None:
      w_p, w_n = jnp.reshape(w_p, layer.scale_shape), jnp.reshape(w_n, layer.scale_shape)
    out[layer.kernel_path] = TernaryWeights.from_latent(module['kernel'], w_p, w_n, layer.quant, layer.scale_shape)
  return out


def ternary_kernels(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, jax.Array]:
  """{kernel path: dense ternary kernel (float32)} as used in the forward pass."""
  return {p: tw.dense() for p, tw in ternary_weights(params, layers).items()}


def layer_sparsity(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, float]:
  """{kernel path: fraction of zeros in the ternary kernel}."""
  return {p: tw.sparsity for p, tw in ternary_weights(params, layers).items()}


def layer_scales(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, tuple[float, float]]:
  """{kernel path: (w_p, w_n)} as used in the forward pass (TWN, BitNet: the computed scale twice; per-channel
  scales: their mean over channels)."""
  return {p: (float(jnp.mean(tw.w_p)), float(jnp.mean(tw.w_n))) for p, tw in ternary_weights(params, layers).items()}


def rule_settings(quant) -> dict[str, Any]:
  """A layer's quantization settings as reported: method, the threshold rule in force and its factor, and
  what differs from the defaults (positive scales, scale granularity, activations)."""
  rule = quant.threshold_rule
  out = {'method': quant.method, 'threshold': rule}
  factor = THRESHOLDS[rule].factor if rule is not None else None
  if factor is not None:
    out[factor] = float(getattr(quant, factor))
  if quant.spec.trained_scales and quant.positive_scales:
    out['positive_scales'] = True
  if getattr(quant, 'scale_granularity', 'tensor') != 'tensor':
    out['scale_granularity'] = quant.scale_granularity
  if quant.activations != 'float':
    out['activations'] = quant.activations
  return out


def layer_rules(layers: Sequence[TernaryLayer]) -> dict[str, dict[str, Any]]:
  """{kernel path: `rule_settings` of the layer}."""
  return {layer.kernel_path: rule_settings(layer.quant) for layer in layers}


def count_params(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, int]:
  """{'ternary': #weights stored as ternary codes, 'full_precision': #other parameters (scales included)}."""
  total = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
  ternary = sum(int(np.prod(np.shape(_get(params, layer.path)['kernel']))) for layer in layers)
  return {'ternary': ternary, 'full_precision': total - ternary}
