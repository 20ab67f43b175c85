"""The quantization settings of a layer: one frozen, keyword-only dataclass.

Two choices are separate: the *method* is the scale rule ('ttq': trained W_p / W_n; 'twn': TWN's analytic
alpha = mean of |w| above delta; 'fp': no quantization) and the *threshold* is the rule for delta ('max':
t * max|w|, the TTQ paper's; 'mean': k * mean|w|, TWN's; 'sparsity': a fixed zero fraction). Left at
None, the threshold is the method's own rule (`METHODS[method]`), so `QuantConfig(method='twn')` is TWN
exactly as Li & Liu define it and `QuantConfig()` is TTQ as the paper defines it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from ttq_jax.quant import _ternary
from ttq_jax.quant._ternary import check_positive, check_unit_interval

# method -> its own threshold rule (what `threshold=None` means); 'fp' has none.
METHODS: dict[str, str | None] = {'ttq': 'max', 'twn': 'mean', 'fp': None}
# threshold rule -> delta(kernel, quant) (no gradient)
THRESHOLDS: dict[str, Callable[[jax.Array, 'QuantConfig'], jax.Array]] = {
    'max': lambda w, q: _ternary.delta_from_max(w, q.t),            # TTQ paper Eq. 9
    'mean': lambda w, q: _ternary.delta_from_mean(w, q.k),          # TWN (Li & Liu 2016)
    'sparsity': lambda w, q: _ternary.delta_from_sparsity(w, q.sparsity),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """How a ternary layer quantizes its kernel.

  Attributes:
    method: the scale rule: 'ttq' (trained w_p / w_n, the paper), 'twn' (alpha = mean |w| above delta,
      Li & Liu 2016) or 'fp' (no quantization).
    threshold: the delta rule: None (the method's own: 'max' for ttq, 'mean' for twn), 'max'
      (delta = t * max|w|, paper Eq. 9), 'mean' (delta = k * mean|w|, TWN's) or 'sparsity' (a fixed
      zero fraction). Any rule works with either method.
    t: threshold factor for 'max' (paper: 0.05).
    k: threshold factor for 'mean' (TWN: 0.7).
    sparsity: zero fraction for 'sparsity' (paper sweeps 0 to 0.5).
    w_p_init, w_n_init: initial scales (official code: 1.0).
    positive_scales: use |w_p|, |w_n| in the forward pass so the scales cannot flip sign
      (the official code has no such guard).
  """

  method: str = 'ttq'
  threshold: str | None = None
  t: float = 0.05
  k: float = _ternary.TWN_K
  sparsity: float = 0.5
  w_p_init: float = 1.0
  w_n_init: float = 1.0
  positive_scales: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'quant.method={self.method!r} is unknown: allowed are {", ".join(METHODS)}')
    if self.threshold is not None and self.threshold not in THRESHOLDS:
      raise ValueError(f'quant.threshold={self.threshold!r} is unknown: allowed are None (the method\'s own), '
                       f'{", ".join(THRESHOLDS)}')
    check_unit_interval('quant.t', self.t)
    check_positive('quant.k', self.k)
    check_unit_interval('quant.sparsity', self.sparsity)

  @property
  def quantized(self) -> bool:
    return self.method != 'fp'

  @property
  def threshold_rule(self) -> str | None:
    """The threshold rule in force: `threshold`, or the method's own when None (None for 'fp')."""
    if not self.quantized:
      return None
    return self.threshold or METHODS[self.method]

  def delta(self, kernel: jax.Array) -> jax.Array:
    """The layer's threshold for `kernel` under the rule in force (no gradient)."""
    return THRESHOLDS[self.threshold_rule](kernel, self)

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any]) -> 'QuantConfig':
    """Builds from a dict / ConfigDict, ignoring keys that are not layer settings."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(m).items() if k in names})
