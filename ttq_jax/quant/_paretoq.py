"""ParetoQ's ternary quantizer (Liu et al. 2025) in pure `jax.numpy`: a learned scale with an LSQ-style gradient."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ttq_jax.quant._ternary import _check_scale, sum_to_shape

# --------------------------------------------------------------------------- ParetoQ ternary (Liu et al. 2025)
#
# facebookresearch/ParetoQ, models/utils_quant.py, StretchedElasticQuant with w_bits=0 (n_levels 1.5, shift 0):
#   a = where(alpha > eps, alpha, eps);  W_q = a * round(clamp(W / a, -c, c) * 1.5) / 1.5,  c = 1 - 1e-2
#   backward:  u = W / a;  small = u < -c;  big = u > c;  middle = the rest
#              dW = middle * G;  dalpha = sum over the row of (-small + big + middle * (q(u) - u)) * G / sqrt(numel(W))
# dalpha goes to the raw alpha even where it is clamped at eps (the clamp is outside autograd's view there).
# torch.round rounds half to even, as jnp.round; decisions are taken in float32.

PARETOQ_EPS = 1e-5
PARETOQ_CLIP = 1.0 - 1e-2
PARETOQ_LEVELS = 1.5


def paretoq_codes(w: jax.Array, alpha: jax.Array) -> jax.Array:
  """round(clip(w / a, -0.99, 0.99) * 1.5) in {-1, 0, +1} (float32), a = max(alpha, 1e-5): the one place ParetoQ's
  codes are decided (the forward kernel is a * codes / 1.5, the export these codes with the scale 2a / 3)."""
  a = jnp.maximum(jnp.asarray(alpha, jnp.float32), PARETOQ_EPS)
  return jnp.round(jnp.clip(jnp.asarray(w, jnp.float32) / a, -PARETOQ_CLIP, PARETOQ_CLIP) * PARETOQ_LEVELS)


def paretoq_fwd(w, alpha):
  """Forward rule of ParetoQ's ternary quantizer; returns (W_q in w's dtype, residuals)."""
  a = jnp.maximum(jnp.asarray(alpha, jnp.float32), PARETOQ_EPS)
  wq = a * paretoq_codes(w, alpha) / PARETOQ_LEVELS
  return wq.astype(w.dtype), (w, alpha)


def paretoq_bwd(residuals, g):
  """Backward rule (LSQ-style): dW = g where |W / a| <= 0.99, else 0; dalpha = the sum, over the axes alpha
  broadcasts along, of s * g / sqrt(numel(W)), s = -1 below -0.99, +1 above 0.99, q(u) - u between."""
  w, alpha = residuals
  a = jnp.maximum(jnp.asarray(alpha, jnp.float32), PARETOQ_EPS)
  u = jnp.asarray(w, jnp.float32) / a
  small, big = u < -PARETOQ_CLIP, u > PARETOQ_CLIP
  middle = ~(small | big)
  g32 = g.astype(jnp.float32)
  q = jnp.round(jnp.clip(u, -PARETOQ_CLIP, PARETOQ_CLIP) * PARETOQ_LEVELS) / PARETOQ_LEVELS
  s = jnp.where(small, -1.0, jnp.where(big, 1.0, q - u))
  dalpha = (sum_to_shape(s * g32, jnp.shape(alpha)) / math.sqrt(w.size)).astype(jnp.asarray(alpha).dtype)
  dw = jnp.where(middle, g32, 0.0).astype(w.dtype)
  return dw, dalpha


@jax.custom_vjp
def _paretoq_ternarize(w, alpha):
  return paretoq_fwd(w, alpha)[0]


_paretoq_ternarize.defvjp(paretoq_fwd, paretoq_bwd)


def paretoq_ternarize(w: jax.Array, alpha: jax.Array) -> jax.Array:
  """ParetoQ's ternary quantizer: a * round(clip(w / a, -0.99, 0.99) * 1.5) / 1.5, a = max(alpha, 1e-5), levels
  -2a/3, 0, +2a/3 (zero where |w / a| <= 1/3). `alpha`: 0-d (per tensor, upstream's `layerwise`) or broadcastable
  to `w` (per output channel). Gradients: `paretoq_bwd`."""
  _check_scale('alpha', alpha, jnp.shape(w))
  return _paretoq_ternarize(w, jnp.asarray(alpha))


def max_abs(w: jax.Array, axes=None) -> jax.Array:
  """max|w| in float32 over `axes` (keepdims; None: the whole tensor, 0-d): ParetoQ's initial alpha."""
  a = jnp.abs(jnp.asarray(w, jnp.float32))
  return jnp.max(a) if axes is None else jnp.max(a, axis=axes, keepdims=True)
