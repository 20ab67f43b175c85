"""The dispatch tables of quantization: `METHODS` (the scale rule of a layer) and `THRESHOLDS` (its delta rule).

A method owns everything that differs between methods: whether it quantizes at all, whether its scales are
trained parameters (and their init), its forward kernel with its gradient rule, the codes and scales it
exports, its own threshold rule and the threshold rules it accepts. Everything outside `ttq_jax/quant/`
asks these tables; adding a method is one entry here plus its tests.

    METHODS['ttq'].kernel(w, w_p, w_n, quant)        # the kernel the forward pass computes with
    METHODS['ttq'].weights(w, w_p, w_n, quant)       # (codes, w_p, w_n): what is reported and exported
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ttq_jax.quant import _ternary


@dataclasses.dataclass(frozen=True)
class Threshold:
  """A delta rule: `delta(w, quant)` (0-d, no gradient); `factor`: the QuantConfig field holding its parameter
  (None: a rule without one)."""
  name: str
  factor: str | None
  delta: Callable[[jax.Array, Any], jax.Array]


THRESHOLDS: dict[str, Threshold] = {t.name: t for t in (
    Threshold('max', 't', lambda w, q: _ternary.delta_from_max(w, q.t)),               # t * max|w| (TTQ Eq. 9)
    Threshold('mean', 'k', lambda w, q: _ternary.delta_from_mean(w, q.k)),             # k * mean|w| (TWN)
    Threshold('sparsity', 'sparsity', lambda w, q: _ternary.delta_from_sparsity(w, q.sparsity)),  # a zero fraction
    # 0.5 * max(mean|w|, 1e-5): zero exactly when round(|w| / max(mean|w|, 1e-5)) = 0 (BitNet b1.58)
    Threshold('absmean', None, lambda w, q: _ternary.bitnet_delta(w)),
)}

COMMON_THRESHOLDS = ('max', 'mean', 'sparsity')

# quant.activations -> what the input of a selected layer goes through: None (as it comes) or
# f(x, contracted input axes) with a straight-through gradient.
ACTIVATIONS: dict[str, Callable[[jax.Array, tuple[int, ...]], jax.Array] | None] = {
    'float': None,
    'int8': _ternary.absmax_int8,   # BitNet b1.58's 8-bit absmax, per position
}


def _reduce_axes(scale_shape) -> tuple[int, ...] | None:
  """Axes a per-output-channel statistic reduces over (None: all, per tensor)."""
  if not scale_shape:
    return None
  return tuple(i for i, s in enumerate(scale_shape) if s == 1)


def _codes(positive, negative) -> jax.Array:
  return jnp.where(positive, 1, jnp.where(negative, -1, 0)).astype(jnp.int8)


@dataclasses.dataclass(frozen=True)
class Method:
  """One scale rule. `quantized`: False for full precision; `trained_scales`: the layer owns w_p / w_n
  parameters (initialised to `QuantConfig.w_p_init` / `w_n_init`); `own_threshold`: the rule that
  `QuantConfig.threshold=None` means; `thresholds`: the rules it accepts."""
  name: str
  quantized: bool
  trained_scales: bool
  own_threshold: str | None
  thresholds: tuple[str, ...]

  def check_threshold(self, threshold: str | None) -> None:
    if threshold is None or threshold in self.thresholds:
      return
    if threshold not in THRESHOLDS:
      raise ValueError(f"quant.threshold={threshold!r} is unknown: allowed are None (the method's own), "
                       f'{", ".join(THRESHOLDS)}')
    allowed = ', '.join(self.thresholds) or 'none'
    raise ValueError(f'quant.threshold={threshold!r} does not combine with quant.method={self.name!r}: allowed are '
                     f"None (the method's own) or {allowed}")

  def kernel(self, w, w_p, w_n, quant, scale_shape=()) -> jax.Array:
    """The kernel the forward pass computes with (its custom gradient included), from the latent `w`."""
    raise NotImplementedError

  def weights(self, w, w_p, w_n, quant, scale_shape=()) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(int8 codes in {-1, 0, +1}, w_p, w_n as float32): the kernel is where(codes > 0, w_p, -w_n or 0)."""
    raise ValueError(f"quant.method={self.name!r} has no ternary weights: allowed are "
                     f'{", ".join(n for n, m in METHODS.items() if m.quantized)}')


class _FullPrecision(Method):

  def kernel(self, w, w_p, w_n, quant, scale_shape=()):
    return w


class _TTQ(Method):

  def kernel(self, w, w_p, w_n, quant, scale_shape=()):
    w_p, w_n = _ternary.effective_scales(w_p, w_n, quant.positive_scales)
    return _ternary.ternarize(w, w_p, w_n, quant.delta(w))

  def weights(self, w, w_p, w_n, quant, scale_shape=()):
    w = jnp.asarray(w, jnp.float32)
    positive, negative = _ternary.ternary_masks(w, quant.delta(w))
    w_p, w_n = _ternary.effective_scales(jnp.asarray(w_p), jnp.asarray(w_n), quant.positive_scales)
    return _codes(positive, negative), jnp.asarray(w_p, jnp.float32), jnp.asarray(w_n, jnp.float32)


class _TWN(Method):

  def kernel(self, w, w_p, w_n, quant, scale_shape=()):
    return _ternary.twn_ternarize(w, quant.delta(w.astype(jnp.float32)))

  def weights(self, w, w_p, w_n, quant, scale_shape=()):
    w = jnp.asarray(w, jnp.float32)
    delta = quant.delta(w)
    positive, negative = _ternary.ternary_masks(w, delta)
    alpha = _ternary.twn_scale(w, delta)
    return _codes(positive, negative), alpha, alpha


class _BitNet(Method):

  def kernel(self, w, w_p, w_n, quant, scale_shape=()):
    return _ternary.bitnet_ternarize(w, _reduce_axes(scale_shape))

  def weights(self, w, w_p, w_n, quant, scale_shape=()):
    s = _ternary.bitnet_scale(w, _reduce_axes(scale_shape))
    inverse = 1.0 / s  # +-1 / s is exactly what the forward kernel's codes / s gives
    return _ternary.bitnet_codes(w, s).astype(jnp.int8), inverse, inverse


METHODS: dict[str, Method] = {m.name: m for m in (
    # trained W_p / W_n per layer (Zhu et al. 2017); custom_vjp: dW_p = sum of g over w > delta, dW_n = -sum over
    # w < -delta, dw scaled by the scale of its set
    _TTQ('ttq', quantized=True, trained_scales=True, own_threshold='max', thresholds=COMMON_THRESHOLDS),
    # alpha = mean |w| above delta (Li & Liu 2016); straight-through
    _TWN('twn', quantized=True, trained_scales=False, own_threshold='mean', thresholds=COMMON_THRESHOLDS),
    # clip(round(w * s), -1, 1) / s, s = 1 / max(mean|w|, 1e-5) (BitNet b1.58); straight-through, none to s
    _BitNet('bitnet', quantized=True, trained_scales=False, own_threshold='absmean', thresholds=('absmean',)),
    _FullPrecision('fp', quantized=False, trained_scales=False, own_threshold=None, thresholds=()),
)}
