"""Ternary quantizers in pure `jax.numpy` (no Flax).

Trained Ternary Quantization (TTQ; Zhu, Han, Mao, Dally, ICLR 2017, arXiv:1612.01064), Sec. 3:

  forward   wt = +w_p if w > delta;  0 if |w| <= delta;  -w_n if w < -delta
  backward  dL/dw_p = sum_{w > delta} g
            dL/dw_n = -sum_{w < -delta} g   (the paper prints `+`; wt = -w_n, so autodiff gives `-`)
            dL/dw   = w_p * g on {w > delta}, g on {|w| <= delta}, w_n * g on {w < -delta}
            delta receives no gradient.

TWN (Li & Liu 2016) is here too as the untrained-scale baseline, and BitNet b1.58's weights and activations
(ParetoQ's quantizer: `_paretoq.py`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check_scalar(name: str, x) -> None:
  if jnp.ndim(x) != 0:
    raise ValueError(f'{name} must be a scalar (0-d array), got shape {jnp.shape(x)}')


def _check_scale(name: str, x, w_shape) -> None:
  """A scale is a scalar (per tensor) or broadcasts to the kernel (e.g. one value per output channel)."""
  shape = jnp.shape(x)
  if len(shape) > len(w_shape) or any(s not in (1, d) for s, d in zip(shape[::-1], w_shape[::-1])):
    raise ValueError(f'{name} must be a scalar or broadcast to the weights\' shape {tuple(w_shape)}, got shape {shape}')


def sum_to_shape(x: jax.Array, shape) -> jax.Array:
  """Sums `x` over the axes that `shape` broadcasts along (the adjoint of broadcasting to x.shape)."""
  lead = x.ndim - len(shape)
  x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
  axes = tuple(i for i, s in enumerate(shape) if s == 1 and x.shape[i] != 1)
  return (jnp.sum(x, axis=axes, keepdims=True) if axes else x).reshape(shape)


def check_unit_interval(name: str, value: float) -> None:
  """Raises ValueError unless 0 <= value < 1 (for `t` and `sparsity`)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value < 1.0:
    raise ValueError(f'{name}={value!r} is out of range: allowed is 0 <= {name} < 1')


# --------------------------------------------------------------------------- TTQ ternarize


def ternary_masks(w, delta):
  """(w > delta, w < -delta): the index sets I_p and I_n of the paper; the one place codes are decided."""
  positive = w > delta
  negative = w < -delta
  return positive, negative


def ternarize_fwd(w, w_p, w_n, delta):
  """Forward rule of TTQ (paper Eq. 6); returns (wt, residuals)."""
  positive, negative = ternary_masks(w, delta)
  w_p_c = w_p.astype(w.dtype)
  w_n_c = w_n.astype(w.dtype)
  zero = jnp.zeros((), w.dtype)
  wt = jnp.where(positive, w_p_c, jnp.where(negative, -w_n_c, zero))
  return wt, (w, w_p, w_n, delta)


def ternarize_bwd(residuals, g):
  """Backward rule of TTQ (paper Eqs. 7-8, with the W_n sign corrected)."""
  w, w_p, w_n, delta = residuals
  positive, negative = ternary_masks(w, delta)
  g32 = g.astype(jnp.float32)
  zero = jnp.zeros((), jnp.float32)
  # Scale gradients: sums over the positive / negative index sets (per output channel for per-channel
  # scales), accumulated in float32.
  dw_p = sum_to_shape(jnp.where(positive, g32, zero), w_p.shape).astype(w_p.dtype)
  dw_n = -sum_to_shape(jnp.where(negative, g32, zero), w_n.shape).astype(w_n.dtype)
  # Latent weights: straight-through estimator scaled by the scale of the set they fall in.
  factor = jnp.where(positive, w_p.astype(g32.dtype), jnp.where(negative, w_n.astype(g32.dtype), 1.0))
  dw = (factor * g32).astype(w.dtype)
  ddelta = jnp.zeros_like(delta)
  return dw, dw_p, dw_n, ddelta


@jax.custom_vjp
def _ternarize(w, w_p, w_n, delta):
  return ternarize_fwd(w, w_p, w_n, delta)[0]


_ternarize.defvjp(ternarize_fwd, ternarize_bwd)


def ternarize(w: jax.Array, w_p: jax.Array, w_n: jax.Array, delta: jax.Array) -> jax.Array:
  """TTQ ternarization with the paper's gradients (W_n sign corrected).

  Args:
    w: latent full-precision weights, any shape and float dtype.
    w_p, w_n: positive / negative scales (trained): 0-d (per tensor, the paper) or broadcastable to `w`
      (e.g. shape (1, ..., 1, C): one per output channel; their gradients are then per-channel sums).
      Cotangents keep their dtype and shape.
    delta: 0-d threshold (no gradient flows to it).

  Returns:
    An array of `w`'s shape and dtype with values in {+w_p, 0, -w_n}.
  """
  _check_scale('w_p', w_p, jnp.shape(w))
  _check_scale('w_n', w_n, jnp.shape(w))
  _check_scalar('delta', delta)
  w_p = jnp.asarray(w_p)
  w_n = jnp.asarray(w_n)
  delta = jnp.asarray(delta, dtype=w.dtype)
  return _ternarize(w, w_p, w_n, delta)


# --------------------------------------------------------------------------- thresholds


def _reduce(fn, x, axes):
  """fn over the whole of `x` (0-d) when `axes` is None, else over `axes` with keepdims (per output channel)."""
  return fn(x) if axes is None else fn(x, axis=tuple(axes), keepdims=True)


def delta_from_max(w: jax.Array, t: float, axes=None) -> jax.Array:
  """The paper's threshold rule: delta = t * max|w| (no gradient; paper uses t = 0.05); over `axes` (keepdims)
  for a per-channel threshold."""
  check_unit_interval('t', t)
  return jax.lax.stop_gradient(t * _reduce(jnp.max, jnp.abs(w), axes))


def check_positive(name: str, value: float) -> None:
  """Raises ValueError unless value > 0 (for `k`)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not value > 0.0:
    raise ValueError(f'{name}={value!r} is out of range: allowed is {name} > 0')


def delta_from_mean(w: jax.Array, k: float, axes=None) -> jax.Array:
  """TWN's threshold rule: delta = k * mean|w| (no gradient; TWN uses k = 0.7, Li & Liu 2016 Eq. 8); over `axes`
  (keepdims) for a per-channel threshold."""
  check_positive('k', k)
  return jax.lax.stop_gradient(k * _reduce(jnp.mean, jnp.abs(w), axes))


def delta_from_sparsity(w: jax.Array, r: float, axes=None) -> jax.Array:
  """Constant-sparsity rule: the threshold that makes a fraction `r` of `w` zero.

  With k = round(r * n) (n: w.size, or the size of one channel over `axes`), delta is the k-th smallest |w| (of
  the channel), so (for distinct values) exactly k entries satisfy |w| <= delta. r = 0 gives delta = 0: binary
  weights.
  """
  check_unit_interval('sparsity', r)
  if axes is None:
    k = int(round(r * w.size))
    if k == 0:
      return jnp.zeros((), w.dtype)
    return jax.lax.stop_gradient(jnp.sort(jnp.abs(w).reshape(-1))[k - 1])
  axes = tuple(a % w.ndim for a in axes)
  kept = tuple(i for i in range(w.ndim) if i not in axes)
  n = int(math.prod(w.shape[i] for i in axes))
  k = int(round(r * n))
  keep_shape = tuple(1 if i in axes else d for i, d in enumerate(w.shape))
  if k == 0:
    return jnp.zeros(keep_shape, w.dtype)
  channels = jnp.transpose(jnp.abs(w), kept + axes).reshape(-1, n)  # one row per channel
  return jax.lax.stop_gradient(jnp.sort(channels, axis=1)[:, k - 1].reshape(keep_shape))


# --------------------------------------------------------------------------- TWN baseline


TWN_K = 0.7  # TWN's threshold factor: delta = 0.7 * mean|w|


def twn_scale(w: jax.Array, delta: jax.Array, axes=None) -> jax.Array:
  """TWN's analytic scale for a given threshold: alpha = mean of |w| over |w| > delta (float32, no gradient;
  0 when no weight is above delta); over `axes` (keepdims) per output channel, with `delta` per channel too."""
  a = jnp.abs(w).astype(jnp.float32)
  above = a > jnp.asarray(delta, jnp.float32)
  total = _reduce(jnp.sum, jnp.where(above, a, 0.0), axes)
  return jax.lax.stop_gradient(total / jnp.maximum(_reduce(jnp.sum, above, axes), 1))


def twn_threshold_and_scale(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """TWN: delta = 0.7 * mean|w|, alpha = mean(|w| over |w| > delta); both float32, without gradient."""
  delta = delta_from_mean(jnp.abs(w).astype(jnp.float32), TWN_K)
  return delta, twn_scale(w, delta)


def twn_ternarize(w: jax.Array, delta: jax.Array | None = None, axes=None) -> jax.Array:
  """Ternary Weight Networks (Li & Liu 2016): alpha * sign(w) where |w| > delta, else 0.

  `delta`: the threshold (0-d; default TWN's own, 0.7 * mean|w|); alpha = mean of |w| above it. `axes`: per
  output channel, `delta` then broadcasts against `w` (one per channel) and alpha is taken over `axes`. The
  scale is not trained; the gradient to `w` is the plain straight-through estimator (dw = g).
  """
  if delta is None:
    delta, alpha = twn_threshold_and_scale(w)
  else:
    if axes is None:
      _check_scalar('delta', delta)
    else:
      _check_scale('delta', delta, jnp.shape(w))
    delta = jax.lax.stop_gradient(jnp.asarray(delta, jnp.float32))
    alpha = twn_scale(w, delta, axes)
  wt = jnp.where(jnp.abs(w) > delta.astype(w.dtype), jnp.sign(w) * alpha.astype(w.dtype), jnp.zeros((), w.dtype))
  return w + jax.lax.stop_gradient(wt - w)


def effective_scales(w_p, w_n, positive: bool):
  """The scales the forward pass uses: |w_p|, |w_n| with `positive_scales` (they cannot flip sign), else as stored."""
  if positive:
    return jnp.abs(w_p), jnp.abs(w_n)
  return w_p, w_n


# --------------------------------------------------------------------------- BitNet b1.58 (Ma et al. 2024)
#
# The published training code ("The Era of 1-bit LLMs: training tips, code and FAQ"):
#   weight_quant(w):     s = 1 / mean|w|.clamp(min=1e-5);  (w * s).round().clamp(-1, 1) / s
#   activation_quant(x): s = 127 / max|x|.clamp(min=1e-5) over the last axis;  (x * s).round().clamp(-128, 127) / s
#   both used as  w + (quant(w) - w).detach():  the gradient is the identity, none reaches the scale.
# torch.round rounds half to even, as jnp.round. Decisions are taken in float32 whatever the compute dtype.

BITNET_EPS = 1e-5


def bitnet_scale(w: jax.Array, axes=None) -> jax.Array:
  """s = 1 / max(mean|w|, 1e-5) in float32 (over `axes`, keepdims; None: the whole tensor, 0-d); no gradient."""
  a = jnp.abs(jnp.asarray(w, jnp.float32))
  mean = jnp.mean(a) if axes is None else jnp.mean(a, axis=axes, keepdims=True)
  return jax.lax.stop_gradient(1.0 / jnp.maximum(mean, BITNET_EPS))


def bitnet_codes(w: jax.Array, s: jax.Array) -> jax.Array:
  """clip(round(w * s), -1, 1) in float32, rounding half to even: the one place BitNet's codes are decided
  (the forward kernel is these codes / s, the export these codes with the scale 1 / s)."""
  return jnp.clip(jnp.round(jnp.asarray(w, jnp.float32) * s), -1.0, 1.0)


def bitnet_delta(w: jax.Array) -> jax.Array:
  """BitNet's threshold in the table's terms: 0.5 * max(mean|w|, 1e-5) (per tensor; no gradient)."""
  return jax.lax.stop_gradient(0.5 / bitnet_scale(w))


def straight_through_bwd(axes, residuals, g):
  """The backward rule of BitNet's quantizers: the identity to the input (the whole quantization residual is
  held constant, as `x + (quant(x) - x).detach()`), nothing to the scale or the static axes."""
  del axes, residuals
  return (g,)


def _straight_through(fwd):
  """A custom_vjp `f(x, axes)` (axes static) with forward `fwd` and the identity as its backward."""
  f = jax.custom_vjp(lambda x, axes: fwd(x, axes)[0], nondiff_argnums=(1,))
  f.defvjp(fwd, straight_through_bwd)
  return f


def bitnet_ternarize_fwd(w, axes):
  s = bitnet_scale(w, axes)
  return (bitnet_codes(w, s) / s).astype(w.dtype), None


_bitnet_ternarize = _straight_through(bitnet_ternarize_fwd)


def bitnet_ternarize(w: jax.Array, axes=None) -> jax.Array:
  """BitNet b1.58's weight quantizer: clip(round(w * s), -1, 1) / s, s = 1 / max(mean|w|, 1e-5) per tensor
  (`axes`=None) or over `axes` (per output feature). Straight-through: dw = g exactly; the scale gets none."""
  return _bitnet_ternarize(w, None if axes is None else tuple(axes))


INT8_MAX = 127.0


def absmax_int8_fwd(x, axes):
  s = INT8_MAX / jnp.maximum(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)), axis=axes, keepdims=True), BITNET_EPS)
  q = jnp.clip(jnp.round(jnp.asarray(x, jnp.float32) * s), -128.0, 127.0) / s
  return q.astype(x.dtype), None


_absmax_int8 = _straight_through(absmax_int8_fwd)


def absmax_int8(x: jax.Array, axes) -> jax.Array:
  """BitNet b1.58's 8-bit activations: per position (max over `axes`, the contracted input axes),
  s = 127 / max(max|x|, 1e-5), x_q = clip(round(x * s), -128, 127) / s. Straight-through: dx = g."""
  axes = tuple(int(a) % x.ndim for a in axes)
  return _absmax_int8(x, axes)
