"""Reporting helpers over a params tree and the model's ternary layers (`ternary_layers`): codes, one
`LayerReport` per layer (sparsity, scales, counts, bytes), parameter counts. Paths are slash-joined Flax
paths of kernels, e.g. `res2_0/conv1/kernel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ttq_jax import paths
from ttq_jax.quant.methods import THRESHOLDS, scale_params
from ttq_jax.quant.rules import TernaryLayer
from ttq_jax.quant.weights import TernaryWeights


def ternary_weights(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, TernaryWeights]:
  """{kernel path: TernaryWeights} of every ternary layer (scales in their broadcast shape)."""
  out = {}
  for layer in layers:
    module = paths.at(params, layer.path)
    scales = scale_params(module.__getitem__, layer.quant.spec, layer.scale_shape)
    out[layer.kernel_path] = TernaryWeights.from_latent(module['kernel'], scales, layer.quant, layer.scale_shape)
  return out


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """What is reported of one ternary layer, built in one place (`of`) from its `TernaryWeights`: by the final
  table, `--mode eval`, the export log and `export_format.read` alike.

  numel: weights of the kernel; sparsity: fraction of zero codes; w_p / w_n: the scales the forward pass uses
  (their mean over channels with per-channel scales; TWN's alpha, BitNet's 1 / s and ParetoQ's 2a / 3 twice); per_channel:
  whether the scales are per output feature; packed_bytes: in an export file, its codes, shape and scales.
  """
  numel: int
  sparsity: float
  w_p: float
  w_n: float
  per_channel: bool
  packed_bytes: int = 0

  @classmethod
  def of(cls, weights: TernaryWeights, packed_bytes: int = 0) -> 'LayerReport':
    codes = np.asarray(weights.codes)
    return cls(numel=int(codes.size), sparsity=float(np.mean(codes == 0)) if codes.size else 0.0,
               w_p=float(np.mean(weights.w_p)), w_n=float(np.mean(weights.w_n)),
               per_channel=bool(np.ndim(weights.w_p)), packed_bytes=int(packed_bytes))

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def layer_reports(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, LayerReport]:
  """{kernel path: LayerReport} of every ternary layer."""
  return {p: LayerReport.of(tw) for p, tw in ternary_weights(params, layers).items()}


def ternary_kernels(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, jax.Array]:
  """{kernel path: dense ternary kernel (float32)} as used in the forward pass."""
  return {p: tw.dense() for p, tw in ternary_weights(params, layers).items()}


def layer_sparsity(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, float]:
  """{kernel path: fraction of zeros in the ternary kernel}."""
  return {p: r.sparsity for p, r in layer_reports(params, layers).items()}


def layer_scales(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, tuple[float, float]]:
  """{kernel path: (w_p, w_n)} as used in the forward pass (TWN, BitNet: the computed scale twice; per-channel
  scales: their mean over channels)."""
  return {p: (r.w_p, r.w_n) for p, r in layer_reports(params, layers).items()}


NEAR_THRESHOLD_BAND = 0.1  # near_threshold: | |w| - delta | <= 0.1 * delta


def near_threshold(params: Mapping[str, Any], layers: Sequence[TernaryLayer]) -> dict[str, float]:
  """{kernel path: fraction of latent weights with | |w| - delta | <= 0.1 * delta}, delta the zero threshold in
  force for that weight (`METHODS[method].delta`: per tensor, or per channel for per-channel TWN / BitNet and
  ParetoQ's a / 3): the weights a small step moves across a threshold ("deadzone trapping", Tequila 2026)."""
  out = {}
  for layer in layers:
    module = paths.at(params, layer.path)
    kernel = jnp.asarray(module['kernel'], jnp.float32)
    delta = layer.quant.spec.delta(kernel, scale_params(module.__getitem__, layer.quant.spec, layer.scale_shape),
                                   layer.quant, layer.scale_shape)
    near = jnp.abs(jnp.abs(kernel) - delta) <= NEAR_THRESHOLD_BAND * delta
    out[layer.kernel_path] = float(jnp.mean(near))
  return out


def flip_rates(previous: Mapping[str, np.ndarray], codes: Mapping[str, np.ndarray]) -> dict[str, float]:
  """{kernel path: fraction of codes that differ between two reads} for the layers in both with the same shape."""
  return {p: float(np.mean(np.asarray(c) != np.asarray(previous[p]))) for p, c in codes.items()
          if p in previous and np.shape(previous[p]) == np.shape(c) and np.size(c)}


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
  if quant.scale_granularity != 'tensor':
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
  ternary = sum(int(np.prod(np.shape(paths.at(params, layer.path)['kernel']))) for layer in layers)
  return {'ternary': ternary, 'full_precision': total - ternary}
