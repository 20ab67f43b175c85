"""The byte-level decoder of ttq_jax/lm.py: by value (RMSNorm, rotary), causality, parameter count by hand, and
the rules that make its projections ternary (embedding and head full precision)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttq_jax import lm
from ttq_jax import quant

TINY = dict(num_layers=2, width=16, num_heads=2, mlp_width=24)


def test_rms_norm_by_hand():
  x = jnp.float32([[3.0, 4.0]])  # mean of squares 12.5
  y = lm.RMSNorm(eps=0.0).apply({'params': {'scale': jnp.float32([1.0, 2.0])}}, x)
  np.testing.assert_allclose(y, [[3 / np.sqrt(12.5), 8 / np.sqrt(12.5)]], rtol=1e-6)


def test_rotary_by_hand_and_relative():
  """d = 4: pairs (0, 2) and (1, 3) turn by p * 1 and p * 10000^(-1/2) = p / 100. Dot products of a rotated
  query and key depend on the offset only."""
  x = jnp.float32([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 4)       # [seq 1, heads 1, d 4]
  y = lm.rotary(x, jnp.array([2]))
  a, b = 2.0, 0.02
  np.testing.assert_allclose(y.reshape(-1), [np.cos(a), -np.sin(b), np.sin(a), np.cos(b)], rtol=1e-6)
  q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1, 8))
  dot = lambda i, j: float(jnp.sum(lm.rotary(q, jnp.array([i])) * lm.rotary(k, jnp.array([j]))))
  assert dot(5, 3) == pytest.approx(dot(9, 7), rel=1e-5) and dot(5, 3) != pytest.approx(dot(5, 4), rel=1e-3)


def test_causal_a_later_byte_changes_no_earlier_logit():
  model = lm.LMDecoder(**TINY)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 10), 0, 256)
  variables = model.init(jax.random.PRNGKey(1), tokens)
  out = model.apply(variables, tokens)
  assert out.shape == (2, 10, 256) and out.dtype == jnp.float32
  changed = model.apply(variables, tokens.at[:, 6].set((tokens[:, 6] + 1) % 256))
  np.testing.assert_array_equal(out[:, :6], changed[:, :6])
  assert not np.allclose(out[:, 6:], changed[:, 6:])


def test_parameter_count_by_hand():
  """embed 256 w + head w 256 + final norm w; per block: 4 w^2 (attention) + 3 w m (gated MLP) + norms
  (attention, mlp: w each; sub-norms: w and m). No biases."""
  w, m, n = TINY['width'], TINY['mlp_width'], TINY['num_layers']
  params = lm.LMDecoder(**TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
  expected = 2 * 256 * w + w + n * (4 * w * w + 3 * w * m + 3 * w + m)
  assert sum(x.size for x in jax.tree.leaves(params)) == expected
  assert not any('bias' in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


@pytest.mark.parametrize('method', ['ttq', 'bitnet'])
def test_rules_make_every_projection_ternary_and_keep_embed_and_head(method):
  model = quant.quantize(lm.LMDecoder(**TINY), [quant.Rule(module_path=lm.PROJECTIONS, method=method,
                                                           w_p_init=0.02, w_n_init=0.02)])
  tokens = jnp.zeros((1, 4), jnp.int32)
  layers = {l.path for l in quant.ternary_layers(model, tokens)}
  assert layers == {f'block_{i}/{p}' for i in range(2) for p in ('attention/query', 'attention/key', 'attention/value',
                                                                   'attention/out', 'mlp/gate', 'mlp/up', 'mlp/down')}
  out = model.apply(model.init(jax.random.PRNGKey(0), tokens), tokens)
  assert out.shape == (1, 4, 256) and bool(jnp.all(jnp.isfinite(out)))


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match='width=12 must split into num_heads=8'):
    lm.LMDecoder(width=12, num_heads=8).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="activation='gelu' is unknown: allowed are silu, relu2"):
    lm.LMDecoder(**TINY, activation='gelu').init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
  assert isinstance(lm.LMDecoder(), nn.Module)
