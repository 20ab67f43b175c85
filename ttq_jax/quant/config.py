"""The quantization settings of a layer: one frozen, keyword-only dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ttq_jax.quant._ternary import check_unit_interval

METHODS = ('ttq', 'twn', 'fp')
THRESHOLDS = ('max', 'sparsity')


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """How a ternary layer quantizes its kernel.

  Attributes:
    method: 'ttq' (trained scales, paper), 'twn' (Li & Liu 2016) or 'fp' (no quantization).
    threshold: 'max' (delta = t * max|w|, paper Eq. 9) or 'sparsity' (a fixed zero fraction).
    t: threshold factor for 'max' (paper: 0.05).
    sparsity: zero fraction for 'sparsity' (paper sweeps 0 to 0.5).
    w_p_init, w_n_init: initial scales (official code: 1.0).
    positive_scales: use |w_p|, |w_n| in the forward pass so the scales cannot flip sign
      (the official code has no such guard).
  """

  method: str = 'ttq'
  threshold: str = 'max'
  t: float = 0.05
  sparsity: float = 0.5
  w_p_init: float = 1.0
  w_n_init: float = 1.0
  positive_scales: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'quant.method={self.method!r} is unknown: allowed are {", ".join(METHODS)}')
    if self.threshold not in THRESHOLDS:
      raise ValueError(f'quant.threshold={self.threshold!r} is unknown: allowed are {", ".join(THRESHOLDS)}')
    check_unit_interval('quant.t', self.t)
    check_unit_interval('quant.sparsity', self.sparsity)

  @property
  def quantized(self) -> bool:
    return self.method != 'fp'

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any]) -> 'QuantConfig':
    """Builds from a dict / ConfigDict, ignoring keys that are not layer settings."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(m).items() if k in names})
