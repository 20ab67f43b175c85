"""Tests of the pure-jnp quantizers against hand-computed values (TTQ_SPEC.md, 'The quantizer')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import quant

F32 = jnp.float32


def _grads(w, w_p, w_n, delta, g):
  """Gradients of <ternarize(w), g> w.r.t. (w, w_p, w_n, delta)."""
  def loss(w, w_p, w_n, delta):
    return jnp.sum(quant.ternarize(w, w_p, w_n, delta) * g)
  return jax.grad(loss, argnums=(0, 1, 2, 3))(w, w_p, w_n, delta)


def test_forward_takes_three_values_and_boundary_is_zero():
  w = jnp.array([-1.0, -0.25, -0.2, 0.0, 0.2, 0.25, 0.3], F32)
  wt = quant.ternarize(w, F32(1.5), F32(0.5), F32(0.25))
  np.testing.assert_array_equal(wt, [-0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5])
  assert wt.dtype == w.dtype and wt.shape == w.shape


# Hand-computed cases: (w, delta, w_p, w_n, g) -> (forward, dw, dw_p, dw_n).
HAND_CASES = {
    'mixed': (
        [-2.0, -0.5, -0.05, 0.0, 0.05, 0.3, 1.0], 0.1, 1.5, 0.5, [1, 2, 3, 4, 5, 6, 7],
        [-0.5, -0.5, 0, 0, 0, 1.5, 1.5], [0.5, 1.0, 3, 4, 5, 9.0, 10.5], 13.0, -3.0),
    'all_positive': (
        [1.0, 2.0, 3.0], 0.5, 2.0, 3.0, [1, -1, 2],
        [2, 2, 2], [2, -2, 4], 2.0, 0.0),
    'all_negative': (
        [-1.0, -2.0], 0.5, 2.0, 3.0, [1, 2],
        [-3, -3], [3, 6], 0.0, -3.0),
    'all_zero': (
        [0.1, -0.2, 0.0], 0.5, 2.0, 3.0, [1, 2, 3],
        [0, 0, 0], [1, 2, 3], 0.0, 0.0),
}


@pytest.mark.parametrize('name', sorted(HAND_CASES))
def test_backward_matches_hand_computed(name):
  w, delta, w_p, w_n, g, fwd, dw_exp, dwp_exp, dwn_exp = HAND_CASES[name]
  w, g = jnp.array(w, F32), jnp.array(g, F32)
  np.testing.assert_allclose(quant.ternarize(w, F32(w_p), F32(w_n), F32(delta)), fwd)
  dw, dw_p, dw_n, ddelta = _grads(w, F32(w_p), F32(w_n), F32(delta), g)
  np.testing.assert_allclose(dw, dw_exp, rtol=1e-6)
  np.testing.assert_allclose(dw_p, dwp_exp, rtol=1e-6)
  np.testing.assert_allclose(dw_n, dwn_exp, rtol=1e-6)
  assert float(ddelta) == 0.0
  assert dw_p.shape == () and dw_n.shape == () and dw_p.dtype == F32


def test_wn_gradient_sign_is_negative():
  """wt = -w_n on negative weights, so raising w_n lowers sum(wt): dL/dw_n = -#negatives.

  The paper's printed `+sum` (copied by several PyTorch ports) would give +3 here.
  """
  w = jnp.array([-1.0, -2.0, -3.0, 4.0], F32)
  grad_wn = jax.grad(lambda w_n: jnp.sum(quant.ternarize(w, F32(1.0), w_n, F32(0.1))))(F32(1.0))
  assert float(grad_wn) == -3.0


def _stop_gradient_reference(w, w_p, w_n, delta):
  """Same forward and gradients without custom_vjp: masks and STE factor under stop_gradient."""
  sg = jax.lax.stop_gradient
  pos = sg((w > delta).astype(w.dtype))
  neg = sg((w < -delta).astype(w.dtype))
  factor = sg(pos * w_p + neg * w_n + (1 - pos - neg))
  return pos * w_p - neg * w_n + (factor * w - sg(factor * w))


@pytest.mark.parametrize('seed,w_p,w_n,t', [(0, 1.0, 1.0, 0.05), (1, 0.3, 2.0, 0.2), (2, -0.7, 0.1, 0.5)])
def test_matches_stop_gradient_reference(seed, w_p, w_n, t):
  kw, kg = jax.random.split(jax.random.PRNGKey(seed))
  w = jax.random.normal(kw, (5, 7))
  g = jax.random.normal(kg, (5, 7))
  delta = quant.delta_from_max(w, t)
  def loss(fn):
    return lambda w, a, b: jnp.sum(fn(w, a, b, delta) * g)
  args = (w, F32(w_p), F32(w_n))
  got = jax.grad(loss(quant.ternarize), argnums=(0, 1, 2))(*args)
  ref = jax.grad(loss(_stop_gradient_reference), argnums=(0, 1, 2))(*args)
  np.testing.assert_allclose(quant.ternarize(w, *args[1:], delta), _stop_gradient_reference(w, *args[1:], delta))
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_gradient_through_delta_from_max():
  w = jnp.array([-1.0, 0.02, 0.5, 2.0])
  g = jax.grad(lambda w: jnp.sum(quant.ternarize(w, F32(1.0), F32(1.0), quant.delta_from_max(w, 0.3))))(w)
  # Only the straight-through terms: 1 (w_n) for -1, 1 for the zero, 1 (w_p) for 0.5 and 2.
  np.testing.assert_allclose(g, [1.0, 1.0, 1.0, 1.0])


def test_jit_and_vmap():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 10))
  w_p = jnp.array([1.0, 2.0, 3.0])
  w_n = jnp.array([0.5, 0.5, 0.5])
  delta = jnp.full((3,), 0.1)
  batched = jax.jit(jax.vmap(quant.ternarize))(w, w_p, w_n, delta)
  for i in range(3):
    np.testing.assert_array_equal(batched[i], quant.ternarize(w[i], w_p[i], w_n[i], delta[i]))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(jax.vmap(quant.ternarize)(w, p, w_n, delta))))(w_p)
  np.testing.assert_allclose(grads, jnp.sum(w > 0.1, axis=1))


def test_bfloat16_weights_with_float32_scales():
  w = jnp.array([-1.0, 0.0, 0.5, 2.0], jnp.bfloat16)
  out = quant.ternarize(w, F32(1.5), F32(0.25), jnp.asarray(0.1, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out.astype(F32), [-0.25, 0.0, 1.5, 1.5])
  dw, dw_p, dw_n = jax.grad(
      lambda w, a, b: jnp.sum(quant.ternarize(w, a, b, jnp.asarray(0.1, jnp.bfloat16)).astype(F32)),
      argnums=(0, 1, 2))(w, F32(1.5), F32(0.25))
  assert dw.dtype == jnp.bfloat16 and dw_p.dtype == F32 and dw_n.dtype == F32
  np.testing.assert_allclose(dw.astype(F32), [0.25, 1.0, 1.5, 1.5])
  assert float(dw_p) == 2.0 and float(dw_n) == -1.0


@pytest.mark.parametrize('r', [0.0, 0.1, 0.3, 0.5, 0.75, 0.99])
def test_delta_from_sparsity_hits_fraction(r):
  w = jax.random.normal(jax.random.PRNGKey(3), (17, 23))  # 391 distinct values
  delta = quant.delta_from_sparsity(w, r)
  zeros = float(jnp.mean(quant.ternarize(w, F32(1.0), F32(1.0), delta) == 0))
  assert abs(zeros - r) <= 1.0 / w.size + 1e-9


def test_sparsity_zero_gives_binary():
  w = jax.random.normal(jax.random.PRNGKey(4), (100,))
  wt = quant.ternarize(w, F32(1.0), F32(1.0), quant.delta_from_sparsity(w, 0.0))
  assert set(np.unique(np.asarray(wt)).tolist()) == {-1.0, 1.0}


def test_delta_from_max_value():
  w = jnp.array([0.5, -4.0, 2.0])
  assert float(quant.delta_from_max(w, 0.05)) == pytest.approx(0.2)


def test_twn_matches_formula():
  w = jnp.array([-3.0, -1.0, -0.2, 0.1, 0.5, 2.0])
  # mean|w| = 6.8/6; delta = 0.7 * that = 0.79333; above: 3, 1, 2 -> alpha = 2.0
  out = quant.twn_ternarize(w)
  np.testing.assert_allclose(out, [-2.0, -2.0, 0.0, 0.0, 0.0, 2.0], rtol=1e-6)
  g = jnp.arange(1.0, 7.0)
  np.testing.assert_allclose(jax.grad(lambda w: jnp.sum(quant.twn_ternarize(w) * g))(w), g)


@pytest.mark.parametrize('fn,bad', [
    (lambda: quant.delta_from_max(jnp.ones(3), 1.0), 't=1.0'),
    (lambda: quant.delta_from_max(jnp.ones(3), -0.1), 't=-0.1'),
    (lambda: quant.delta_from_sparsity(jnp.ones(3), 1.5), 'sparsity=1.5'),
    (lambda: quant.ternarize(jnp.ones(3), jnp.ones(2), F32(1.0), F32(0.1)), 'w_p must be a scalar or broadcast'),
    (lambda: quant.ternarize(jnp.ones(3), F32(1.0), jnp.ones((2, 3)), F32(0.1)), 'w_n must be a scalar or broadcast'),
])
def test_bad_input_is_a_clear_value_error(fn, bad):
  with pytest.raises(ValueError, match=bad):
    fn()


def test_per_channel_scales_by_hand():
  """Scales of shape (1, C) (one per output column): the forward picks each column's scale, and the scale
  gradients are the per-column sums over I_p and -sums over I_n."""
  w = jnp.array([[1.0, -1.0, 0.05], [-2.0, 0.5, 3.0]], F32)  # codes [[+, -, 0], [-, +, +]] at delta 0.1
  w_p, w_n = jnp.array([[1.0, 2.0, 3.0]], F32), jnp.array([[0.5, 1.5, 2.5]], F32)
  g = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], F32)
  np.testing.assert_array_equal(quant.ternarize(w, w_p, w_n, F32(0.1)), [[1.0, -1.5, 0.0], [-0.5, 2.0, 3.0]])
  dw, dw_p, dw_n, _ = _grads(w, w_p, w_n, F32(0.1), g)
  np.testing.assert_allclose(dw_p, [[1.0, 5.0, 6.0]])
  np.testing.assert_allclose(dw_n, [[-4.0, -2.0, 0.0]])
  np.testing.assert_allclose(dw, [[1.0, 3.0, 3.0], [2.0, 10.0, 18.0]])
  assert dw_p.shape == w_p.shape == dw_n.shape


@pytest.mark.parametrize('x_shape,shape,expected', [
    ((2, 3), (), 21.0), ((2, 3), (1, 3), [[5.0, 7.0, 9.0]]), ((2, 3), (3,), [5.0, 7.0, 9.0]),
    ((2, 3), (2, 1), [[6.0], [15.0]]), ((2, 3), (2, 3), [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])])
def test_sum_to_shape_is_the_adjoint_of_broadcasting(x_shape, shape, expected):
  x = jnp.arange(1.0, 7.0).reshape(x_shape)
  np.testing.assert_allclose(quant.sum_to_shape(x, shape), expected)
