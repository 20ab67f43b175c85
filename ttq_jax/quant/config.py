"""The quantization settings of a layer: one frozen, keyword-only dataclass.

Two choices are separate: the *method* is the scale rule (`METHODS`: 'ttq' trained W_p / W_n; 'twn' TWN's
analytic alpha = mean of |w| above delta; 'bitnet' BitNet b1.58's absmean; 'paretoq' ParetoQ's trained alpha;
'fp' no quantization) and the
*threshold* is the rule for delta (`THRESHOLDS`: 'max' t * max|w|, the TTQ paper's; 'mean' k * mean|w|,
TWN's; 'sparsity' a fixed zero fraction; 'absmean' BitNet's, which only BitNet takes). Left at None, the
threshold is the method's own rule (`METHODS[method].own_threshold`), so `QuantConfig(method='twn')` is TWN
exactly as Li & Liu define it and `QuantConfig()` is TTQ as the paper defines it. A third, independent
choice is what the layer's input goes through (`activations`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from ttq_jax.quant import _ternary
from ttq_jax.quant._ternary import check_positive, check_unit_interval
from ttq_jax.quant.methods import ACTIVATIONS, METHODS, THRESHOLDS, Method

SCALE_GRANULARITIES = ('tensor', 'channel')


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """How a ternary layer quantizes its kernel.

  Attributes:
    method: the scale rule, a key of `METHODS`: 'ttq' (trained w_p / w_n, the paper), 'twn' (alpha =
      mean |w| above delta, Li & Liu 2016), 'bitnet' (BitNet b1.58's absmean, Ma et al. 2024), 'paretoq' (a
      trained alpha, zero band |w| <= alpha / 3; Liu et al. 2025) or 'fp'.
    threshold: the delta rule, a key of `THRESHOLDS` or None (the method's own: 'max' for ttq, 'mean' for
      twn, 'absmean' for bitnet, none for paretoq): 'max' (delta = t * max|w|, paper Eq. 9), 'mean' (delta =
      k * mean|w|, TWN's) or 'sparsity' (a fixed zero fraction) combine with ttq and twn; bitnet takes only its
      own, paretoq none.
    t: threshold factor for 'max' (paper: 0.05).
    k: threshold factor for 'mean' (TWN: 0.7).
    sparsity: zero fraction for 'sparsity' (paper sweeps 0 to 0.5).
    w_p_init, w_n_init: initial scales (official code: 1.0); ttq only.
    positive_scales: use |w_p|, |w_n| in the forward pass so the scales cannot flip sign
      (the official code has no such guard); ttq only.
    scale_granularity: 'tensor' (one scale set per layer, the papers' TTQ / TWN / BitNet) or 'channel' (one per
      output feature: the kernel's output axes, flattened for DenseGeneral / Einsum with several; ParetoQ's
      per-row alpha). ttq keeps its threshold per tensor; twn takes its threshold and alpha per channel; bitnet
      its absmean per channel; paretoq its alpha (and so its zero band) per channel.
    activations: 'float' (the input as it comes) or 'int8' (BitNet b1.58's 8-bit absmax per position over
      the layer's contracted input axes, straight-through; with any method: 'bitnet' + 'int8' is W1.58A8).
      BitLinear also RMS-normalises its input before quantizing it: that norm is the model's, not this.
  """

  method: str = 'ttq'
  threshold: str | None = None
  t: float = 0.05
  k: float = _ternary.TWN_K
  sparsity: float = 0.5
  w_p_init: float = 1.0
  w_n_init: float = 1.0
  positive_scales: bool = False
  activations: str = 'float'
  scale_granularity: str = 'tensor'

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'quant.method={self.method!r} is unknown: allowed are {", ".join(METHODS)}')
    if self.scale_granularity not in SCALE_GRANULARITIES:
      raise ValueError(f'quant.scale_granularity={self.scale_granularity!r} is unknown: allowed are '
                       f'{", ".join(SCALE_GRANULARITIES)}')
    METHODS[self.method].check(self)
    if self.activations not in ACTIVATIONS:
      raise ValueError(f'quant.activations={self.activations!r} is unknown: allowed are {", ".join(ACTIVATIONS)}')
    check_unit_interval('quant.t', self.t)
    check_positive('quant.k', self.k)
    check_unit_interval('quant.sparsity', self.sparsity)

  @property
  def spec(self) -> Method:
    """The method's entry of `METHODS`."""
    return METHODS[self.method]

  @property
  def quantized(self) -> bool:
    return self.spec.quantized

  @property
  def threshold_rule(self) -> str | None:
    """The threshold rule in force: `threshold`, or the method's own when None (None for 'fp')."""
    if not self.quantized:
      return None
    return self.threshold or self.spec.own_threshold

  def delta(self, kernel: jax.Array) -> jax.Array:
    """The per-tensor threshold for `kernel` under the rule in force (no gradient); the threshold a layer
    uses, per tensor or per channel, is its method's (`METHODS[method].delta`)."""
    return THRESHOLDS[self.threshold_rule].delta(kernel, self)

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any]) -> 'QuantConfig':
    """Builds from a dict / ConfigDict, ignoring keys that are not layer settings."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(m).items() if k in names})
