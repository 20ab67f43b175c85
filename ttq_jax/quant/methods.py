"""The dispatch tables of quantization: `METHODS` (the scale rule of a layer) and `THRESHOLDS` (its delta rule).

A method owns everything that differs between methods: whether it quantizes at all, its trained scale parameters
(names, how they start, per tensor or per channel), its forward kernel with its gradient rule, the codes and
scales it exports, the zero threshold in force for each weight, its own threshold and scale-init rules and the
ones it accepts, and the settings that do not apply to it. Everything outside `ttq_jax/quant/` asks these
tables; adding a method is one entry here plus its tests.

    METHODS['ttq'].scale_names                          # ('w_p', 'w_n'): parameters beside the layer's kernel
    METHODS['ttq'].kernel(w, scales, quant, shape)      # the kernel the forward pass computes with
    METHODS['ttq'].weights(w, scales, quant, shape)     # (codes, w_p, w_n): what is reported and exported

`scales` is {name: value} of the layer's trained scales (empty for methods without), each in `shape`: () per
tensor, or 1s except on the kernel's output axes per output channel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from ttq_jax.quant import _paretoq
from ttq_jax.quant import _ternary


@dataclasses.dataclass(frozen=True)
class Threshold:
  """A delta rule: `delta(w, quant, axes)` (no gradient; `axes` None: 0-d, per tensor; else reduced over `axes`
  with keepdims, per output channel); `factor`: the QuantConfig field holding its parameter (None: none)."""
  name: str
  factor: str | None
  delta: Callable[..., jax.Array]


THRESHOLDS: dict[str, Threshold] = {t.name: t for t in (
    Threshold('max', 't', lambda w, q, axes=None: _ternary.delta_from_max(w, q.t, axes)),    # t * max|w| (TTQ Eq. 9)
    Threshold('mean', 'k', lambda w, q, axes=None: _ternary.delta_from_mean(w, q.k, axes)),  # k * mean|w| (TWN)
    Threshold('sparsity', 'sparsity', lambda w, q, axes=None: _ternary.delta_from_sparsity(w, q.sparsity, axes)),
    # 0.5 * max(mean|w|, 1e-5): zero exactly when round(|w| / max(mean|w|, 1e-5)) = 0 (BitNet b1.58)
    Threshold('absmean', None, lambda w, q, axes=None: jax.lax.stop_gradient(0.5 / _ternary.bitnet_scale(w, axes))),
)}

COMMON_THRESHOLDS = ('max', 'mean', 'sparsity')

# quant.activations -> what the input of a selected layer goes through: None (as it comes) or
# f(x, contracted input axes) with a straight-through gradient.
ACTIVATIONS: dict[str, Callable[[jax.Array, tuple[int, ...]], jax.Array] | None] = {
    'float': None,
    'int8': _ternary.absmax_int8,   # BitNet b1.58's 8-bit absmax, per position
}

# QuantConfig fields that only a method with TTQ's two scales reads: a method with other trained scales refuses them.
TTQ_SCALE_SETTINGS = {'w_p_init': 1.0, 'w_n_init': 1.0, 'positive_scales': False}


def reduce_axes(scale_shape) -> tuple[int, ...] | None:
  """Axes a per-output-channel statistic reduces over (None: all, per tensor)."""
  if not scale_shape:
    return None
  return tuple(i for i, s in enumerate(scale_shape) if s == 1)


def _codes(positive, negative) -> jax.Array:
  return jnp.where(positive, 1, jnp.where(negative, -1, 0)).astype(jnp.int8)


def _in_shape(x, shape) -> jax.Array:
  """`x` (0-d or keepdims) as float32 in the scales' broadcast `shape` (() per tensor)."""
  return jnp.broadcast_to(jnp.asarray(x, jnp.float32), shape) if shape else jnp.asarray(x, jnp.float32).reshape(())


@dataclasses.dataclass(frozen=True)
class Method:
  """One scale rule.

  quantized: False for full precision. scale_names: the trained scale parameters its layers own beside
  `kernel` (stored shape () per tensor, (out,) per output channel; trained in the scales' optimizer group).
  own_threshold / thresholds: the delta rule `QuantConfig.threshold=None` means, and the ones it accepts.
  scale_inits: how its scales are (re)set at `model.init` (the first) and at the switch to ternary
  (`quant.scale_init`; None means the first). granularities: the `scale_granularity` values it implements.
  ttq_settings: whether its trained scales read `TTQ_SCALE_SETTINGS` (a method with other trained scales refuses a
  value set there; one without trained scales ignores them).
  """
  name: str
  quantized: bool
  own_threshold: str | None
  thresholds: tuple[str, ...]
  scale_names: tuple[str, ...] = ()
  scale_inits: tuple[str, ...] = ()
  granularities: tuple[str, ...] = ('tensor', 'channel')
  ttq_settings: bool = False

  @property
  def trained_scales(self) -> bool:
    return bool(self.scale_names)

  @property
  def own_scale_init(self) -> str | None:
    return self.scale_inits[0] if self.scale_inits else None

  def check(self, quant) -> None:
    """Raises ValueError (one line) for a setting of `quant` (QuantConfig / Rule) this method does not take."""
    threshold = quant.threshold
    if threshold is not None and threshold not in self.thresholds:
      if threshold not in THRESHOLDS:
        raise ValueError(f"quant.threshold={threshold!r} is unknown: allowed are None (the method's own), "
                         f'{", ".join(THRESHOLDS)}')
      allowed = ', '.join(self.thresholds) or 'none'
      raise ValueError(f'quant.threshold={threshold!r} does not combine with quant.method={self.name!r}: allowed are '
                       f"None (the method's own){'' if allowed == 'none' else ' or ' + allowed}")
    if quant.scale_granularity not in self.granularities:
      raise ValueError(f'quant.scale_granularity={quant.scale_granularity!r} is not implemented for quant.method='
                       f'{self.name!r}: allowed are {", ".join(self.granularities)}')
    if self.trained_scales and not self.ttq_settings:  # (TWN / BitNet ignore them, as they always did)
      for key, default in TTQ_SCALE_SETTINGS.items():
        if getattr(quant, key) != default:
          raise ValueError(f'quant.{key}={getattr(quant, key)!r} does not apply to quant.method={self.name!r} (its '
                           f'trained scales are {", ".join(self.scale_names)}, not w_p / w_n): allowed is {default!r}')

  def check_scale_init(self, scale_init: str | None) -> None:
    """Raises ValueError unless `scale_init` (config `quant.scale_init`) is None or one of this method's."""
    if scale_init is None or not self.trained_scales or scale_init in self.scale_inits:
      return
    raise ValueError(f'quant.scale_init={scale_init!r} does not apply to quant.method={self.name!r}: allowed are '
                     f"None (the method's own, {self.own_scale_init!r}) or {', '.join(self.scale_inits)}")

  def threshold_axes(self, quant, scale_shape) -> tuple[int, ...] | None:
    """Axes the zero threshold is taken over (None: per tensor)."""
    return None

  def initial_scales(self, w, quant, scale_shape=(), scale_init: str | None = None) -> dict[str, jax.Array]:
    """{name: value in `scale_shape`} of the trained scales for the latent kernel `w` (float32), by `scale_init`
    (None: the method's own, what `model.init` uses)."""
    return {}

  def kernel(self, w, scales: Mapping[str, jax.Array], quant, scale_shape=()) -> jax.Array:
    """The kernel the forward pass computes with (its custom gradient included), from the latent `w`."""
    raise NotImplementedError

  def weights(self, w, scales: Mapping[str, jax.Array], quant, scale_shape=()) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(int8 codes in {-1, 0, +1}, w_p, w_n as float32): the kernel is where(codes > 0, w_p, -w_n or 0)."""
    raise ValueError(f"quant.method={self.name!r} has no ternary weights: allowed are "
                     f'{", ".join(n for n, m in METHODS.items() if m.quantized)}')

  def delta(self, w, scales: Mapping[str, jax.Array], quant, scale_shape=()) -> jax.Array:
    """The zero threshold in force for each weight of the latent `w` (float32; 0-d per tensor, or broadcasting
    to `w` per channel): a weight is zero exactly when |w| <= delta (ParetoQ and BitNet: up to round half to
    even at the boundary)."""
    return jnp.asarray(THRESHOLDS[quant.threshold_rule].delta(w, quant, self.threshold_axes(quant, scale_shape)),
                       jnp.float32)


class _FullPrecision(Method):

  def kernel(self, w, scales, quant, scale_shape=()):
    return w


class _TTQ(Method):
  """The threshold stays per tensor (the paper's Eq. 9) also with per-channel scales."""

  def initial_scales(self, w, quant, scale_shape=(), scale_init=None):
    scale_init = scale_init or self.own_scale_init
    if scale_init == 'constant':  # w_p_init / w_n_init (official code: 1.0)
      return {'w_p': _in_shape(quant.w_p_init, scale_shape), 'w_n': _in_shape(quant.w_n_init, scale_shape)}
    # 'mean_abs': mean |w| of each sign above the threshold (per output channel for per-channel scales)
    w = jnp.asarray(w, jnp.float32)
    delta = quant.delta(w)
    pos, neg = w > delta, w < -delta
    mean = lambda mask, x: (_ternary.sum_to_shape(jnp.where(mask, x, 0), scale_shape) /
                            jnp.maximum(_ternary.sum_to_shape(mask.astype(jnp.float32), scale_shape), 1))
    return {'w_p': mean(pos, w), 'w_n': mean(neg, -w)}

  def kernel(self, w, scales, quant, scale_shape=()):
    w_p, w_n = _ternary.effective_scales(scales['w_p'], scales['w_n'], quant.positive_scales)
    return _ternary.ternarize(w, w_p, w_n, quant.delta(w))

  def weights(self, w, scales, quant, scale_shape=()):
    w = jnp.asarray(w, jnp.float32)
    positive, negative = _ternary.ternary_masks(w, quant.delta(w))
    w_p, w_n = _ternary.effective_scales(jnp.asarray(scales['w_p']), jnp.asarray(scales['w_n']), quant.positive_scales)
    return _codes(positive, negative), jnp.asarray(w_p, jnp.float32), jnp.asarray(w_n, jnp.float32)


class _TWN(Method):
  """Per channel: delta_c by the threshold rule over channel c, alpha_c = mean |w_c| above delta_c."""

  def threshold_axes(self, quant, scale_shape):
    return reduce_axes(scale_shape)

  def kernel(self, w, scales, quant, scale_shape=()):
    axes = reduce_axes(scale_shape)
    return _ternary.twn_ternarize(w, self.delta(w.astype(jnp.float32), scales, quant, scale_shape), axes)

  def weights(self, w, scales, quant, scale_shape=()):
    w = jnp.asarray(w, jnp.float32)
    delta = self.delta(w, scales, quant, scale_shape)
    positive, negative = _ternary.ternary_masks(w, delta)
    alpha = _ternary.twn_scale(w, delta, reduce_axes(scale_shape))
    return _codes(positive, negative), alpha, alpha


class _BitNet(Method):

  def threshold_axes(self, quant, scale_shape):
    return reduce_axes(scale_shape)

  def kernel(self, w, scales, quant, scale_shape=()):
    return _ternary.bitnet_ternarize(w, reduce_axes(scale_shape))

  def weights(self, w, scales, quant, scale_shape=()):
    s = _ternary.bitnet_scale(w, reduce_axes(scale_shape))
    inverse = 1.0 / s  # +-1 / s is exactly what the forward kernel's codes / s gives
    return _ternary.bitnet_codes(w, s).astype(jnp.int8), inverse, inverse


class _ParetoQ(Method):
  """One trained scale `alpha`; the zero band is |w| <= a / 3 (a = max(alpha, 1e-5)), so no threshold rule."""

  def initial_scales(self, w, quant, scale_shape=(), scale_init=None):
    return {'alpha': _in_shape(_paretoq.max_abs(w, reduce_axes(scale_shape)), scale_shape)}  # 'max_abs', its only

  def kernel(self, w, scales, quant, scale_shape=()):
    return _paretoq.paretoq_ternarize(w, scales['alpha'])

  def weights(self, w, scales, quant, scale_shape=()):
    alpha = jnp.asarray(scales['alpha'], jnp.float32)
    level = jnp.maximum(alpha, _paretoq.PARETOQ_EPS) / _paretoq.PARETOQ_LEVELS  # 2a / 3
    return _paretoq.paretoq_codes(w, alpha).astype(jnp.int8), level, level

  def delta(self, w, scales, quant, scale_shape=()):
    return jnp.maximum(jnp.asarray(scales['alpha'], jnp.float32), _paretoq.PARETOQ_EPS) / 3.0


METHODS: dict[str, Method] = {m.name: m for m in (
    # trained W_p / W_n per layer (Zhu et al. 2017); custom_vjp: dW_p = sum of g over w > delta, dW_n = -sum over
    # w < -delta, dw scaled by the scale of its set
    _TTQ('ttq', quantized=True, own_threshold='max', thresholds=COMMON_THRESHOLDS, scale_names=('w_p', 'w_n'),
         scale_inits=('constant', 'mean_abs'), ttq_settings=True),
    # alpha = mean |w| above delta (Li & Liu 2016), per tensor or per output channel; straight-through
    _TWN('twn', quantized=True, own_threshold='mean', thresholds=COMMON_THRESHOLDS),
    # clip(round(w * s), -1, 1) / s, s = 1 / max(mean|w|, 1e-5) (BitNet b1.58); straight-through, none to s
    _BitNet('bitnet', quantized=True, own_threshold='absmean', thresholds=('absmean',)),
    # a * round(clip(w / a, -0.99, 0.99) * 1.5) / 1.5 with a trained alpha starting at max|w| (Liu et al. 2025,
    # ParetoQ); LSQ-style custom_vjp to w and alpha
    _ParetoQ('paretoq', quantized=True, own_threshold=None, thresholds=(), scale_names=('alpha',),
             scale_inits=('max_abs',)),
    _FullPrecision('fp', quantized=False, own_threshold=None, thresholds=()),
)}

# Every `quant.scale_init` some method implements (the config key's allowed values besides None).
SCALE_INITS: tuple[str, ...] = tuple(dict.fromkeys(i for m in METHODS.values() for i in m.scale_inits))


def scale_params(scales_of: Callable[[str], Any], method: Method, scale_shape) -> dict[str, jax.Array]:
  """{name: value in `scale_shape`} of a layer's trained scales read with `scales_of(name)` (stored () or (out,))."""
  return {n: jnp.reshape(scales_of(n), scale_shape) for n in method.scale_names}
