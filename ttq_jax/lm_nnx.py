"""`LMDecoderNNX`: the byte-level decoder of `ttq_jax.lm` written in Flax NNX (`model.name='lm_decoder_nnx'`).

The same architecture, parameter count and layer paths as the Linen `LMDecoder` (`embed`, `block_0/attention/query`,
..., `block_0/mlp/down`, `final_norm`, `head`), so `lm.PROJECTIONS` selects the same layers and the Linen model's
parameters load into it (`from_linen_params`). Its own initialisation draws from `rngs` (NNX initialises at
construction), not from the Linen model's random stream.

    model = LMDecoderNNX(depth=4, width=256, num_heads=4, mlp_width=688, rngs=nnx.Rngs(0))
    logits = model(tokens)                            # tokens int32 [batch, seq] -> [batch, seq, 256]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ttq_jax import paths
from ttq_jax.lm import MLP_ACTIVATIONS, VOCAB, rotary


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x^2) + eps) * scale, statistics in float32 (`lm.RMSNorm`)."""

  def __init__(self, width: int, *, eps: float = 1e-6, dtype: Any = jnp.float32):
    self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps) * self.scale[...]
    return y.astype(self.dtype)


def _dense(n_in: int, n_out: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, rngs=rngs)


class Attention(nnx.Module):
  def __init__(self, width: int, num_heads: int, dtype, rngs: nnx.Rngs):
    self.query, self.key, self.value = (_dense(width, width, dtype, rngs) for _ in range(3))
    self.sub_norm = RMSNorm(width, dtype=dtype)  # BitNet's sub-norm
    self.out = _dense(width, width, dtype, rngs)
    self.num_heads = num_heads

  def __call__(self, x, positions):
    b, t, width = x.shape
    head = width // self.num_heads
    split = lambda y: y.reshape(b, t, self.num_heads, head)
    q, k, v = rotary(split(self.query(x)), positions), rotary(split(self.key(x)), positions), split(self.value(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(head))
    causal = positions[:, None] >= positions[None, :]
    logits = jnp.where(causal[None, None], logits, jnp.finfo(jnp.float32).min)
    y = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1).astype(v.dtype), v).reshape(b, t, width)
    return self.out(self.sub_norm(y))


class MLP(nnx.Module):
  def __init__(self, width: int, hidden: int, activation: str, dtype, rngs: nnx.Rngs):
    self.gate, self.up = _dense(width, hidden, dtype, rngs), _dense(width, hidden, dtype, rngs)
    self.sub_norm = RMSNorm(hidden, dtype=dtype)  # BitNet's sub-norm
    self.down = _dense(hidden, width, dtype, rngs)
    self.activation = activation

  def __call__(self, x):
    h = MLP_ACTIVATIONS[self.activation](self.gate(x)) * self.up(x)
    return self.down(self.sub_norm(h))


class Block(nnx.Module):
  def __init__(self, width: int, num_heads: int, mlp_width: int, activation: str, dtype, rngs: nnx.Rngs):
    self.attention_norm = RMSNorm(width, dtype=dtype)
    self.attention = Attention(width, num_heads, dtype, rngs)
    self.mlp_norm = RMSNorm(width, dtype=dtype)
    self.mlp = MLP(width, mlp_width, activation, dtype, rngs)

  def __call__(self, x, positions):
    x = x + self.attention(self.attention_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))


class LMDecoderNNX(nnx.Module):
  """Byte-level causal decoder: tokens int [batch, seq] -> next-byte logits float32 [batch, seq, 256]."""

  def __init__(self, vocab_size: int = VOCAB, depth: int = 4, width: int = 256, num_heads: int = 4,
               mlp_width: int = 688, activation: str = 'silu', dtype: Any = jnp.float32, *, rngs: nnx.Rngs):
    if width % num_heads or (width // num_heads) % 2:
      raise ValueError(f'width={width} must split into num_heads={num_heads} heads of even size (rotary)')
    if activation not in MLP_ACTIVATIONS:
      raise ValueError(f'activation={activation!r} is unknown: allowed are {", ".join(MLP_ACTIVATIONS)}')
    self.embed = nnx.Embed(vocab_size, width, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.depth, self.dtype = depth, dtype
    for i in range(depth):
      setattr(self, f'block_{i}', Block(width, num_heads, mlp_width, activation, dtype, rngs))
    self.final_norm = RMSNorm(width, dtype=dtype)
    self.head = _dense(width, vocab_size, dtype, rngs)

  def __call__(self, tokens):
    x = self.embed(tokens).astype(self.dtype)
    positions = jnp.arange(tokens.shape[-1])
    for i in range(self.depth):
      x = getattr(self, f'block_{i}')(x, positions)
    return self.head(self.final_norm(x)).astype(jnp.float32)


def from_linen_params(model: nnx.Module, params: dict) -> nnx.Module:
  """`model` (a `LMDecoderNNX`, plain or quantized) holding the Linen `LMDecoder`'s `params` ({'embed':
  {'embedding'}, 'block_0': {'attention': {'query': {'kernel'}}, ...}}) at the same paths; scales a quantized model
  has beside its kernels keep their values."""
  given, flat = paths.flat(params), []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = given.get('/'.join(map(str, path)))
    flat.append((path, variable if value is None else variable.replace(jnp.asarray(value, variable.get_value().dtype))))
  nnx.update(model, nnx.from_flat_state(flat))
  return model
