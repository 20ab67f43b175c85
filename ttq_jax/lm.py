"""`LMDecoder`: a LLaMA-style byte-level decoder in plain Flax, as BitNet b1.58 2B4T arranges it.

RMSNorm pre-norms, BitNet's sub-norms (an RMSNorm before the attention output projection and before the
MLP's down projection), rotary positions, a gated MLP, no biases, causal self-attention, a byte vocabulary
(256 symbols: no tokenizer). Every projection is a plain `nn.Dense` named `attention/{query,key,value,out}` and
`mlp/{gate,up,down}`, so `quant.quantize` rules select them by path; the embedding `embed` and the output
head `head` stay full precision (as BitNet). Every method runs on the same architecture.

    model = LMDecoder(depth=4, width=256, num_heads=4, mlp_width=688)
    logits = model.apply(variables, tokens)          # tokens int32 [batch, seq] -> [batch, seq, 256]
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

VOCAB = 256  # bytes
# `quant.Rule` paths: every attention and MLP projection of every block (embedding and head excluded)
PROJECTIONS = r'block_\d+/(attention/(query|key|value|out)|mlp/(gate|up|down))'
MLP_ACTIVATIONS = {'silu': nn.silu, 'relu2': lambda x: jnp.square(nn.relu(x))}  # LLaMA's SwiGLU, BitNet 2B4T's ReLU^2


def rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), the half-split form of LLaMA / GPT-NeoX: feature pairs
  (i, i + d/2) of `x` [..., seq, heads, d] rotated by angle position * base^(-2i/d). Computed in float32."""
  d = x.shape[-1]
  inv = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  angles = positions.astype(jnp.float32)[:, None] * inv[None, :]          # [seq, d/2]
  cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]      # [seq, 1, d/2]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale, statistics in float32."""
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps) * scale
    return y.astype(self.dtype)


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions):
    b, t, width = x.shape
    head = width // self.num_heads
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name)
    split = lambda y: y.reshape(b, t, self.num_heads, head)
    q = rotary(split(dense(width, 'query')(x)), positions)
    k = rotary(split(dense(width, 'key')(x)), positions)
    v = split(dense(width, 'value')(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(head))
    causal = positions[:, None] >= positions[None, :]
    logits = jnp.where(causal[None, None], logits, jnp.finfo(jnp.float32).min)
    y = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1).astype(v.dtype), v).reshape(b, t, width)
    return dense(width, 'out')(RMSNorm(dtype=self.dtype, name='sub_norm')(y))  # BitNet's sub-norm


class MLP(nn.Module):
  hidden: int
  activation: str = 'silu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name)
    h = MLP_ACTIVATIONS[self.activation](dense(self.hidden, 'gate')(x)) * dense(self.hidden, 'up')(x)
    return dense(x.shape[-1], 'down')(RMSNorm(dtype=self.dtype, name='sub_norm')(h))  # BitNet's sub-norm


class Block(nn.Module):
  num_heads: int
  mlp_width: int
  activation: str = 'silu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions):
    x = x + Attention(self.num_heads, self.dtype, name='attention')(RMSNorm(dtype=self.dtype, name='attention_norm')(x),
                                                                     positions)
    return x + MLP(self.mlp_width, self.activation, self.dtype, name='mlp')(RMSNorm(dtype=self.dtype, name='mlp_norm')(x))


class LMDecoder(nn.Module):
  """Byte-level causal decoder: tokens int [batch, seq] -> next-byte logits float32 [batch, seq, 256]
  (`vocab_size`: 256 bytes)."""
  vocab_size: int = VOCAB
  depth: int = 4
  width: int = 256
  num_heads: int = 4
  mlp_width: int = 688
  activation: str = 'silu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    if self.width % self.num_heads or (self.width // self.num_heads) % 2:
      raise ValueError(f'width={self.width} must split into num_heads={self.num_heads} heads of even size (rotary)')
    if self.activation not in MLP_ACTIVATIONS:
      raise ValueError(f'activation={self.activation!r} is unknown: allowed are {", ".join(MLP_ACTIVATIONS)}')
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), name='embed')(tokens)
    x = x.astype(self.dtype)
    positions = jnp.arange(tokens.shape[-1])
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_width, self.activation, self.dtype, name=f'block_{i}')(x, positions)
    x = RMSNorm(dtype=self.dtype, name='final_norm')(x)
    return nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, name='head')(x).astype(jnp.float32)


# --------------------------------------------------------------------------- sampling

PROMPTS = ('The ', '.. function:: ')  # fixed prompts of the samples a run reports (python_docs' reStructuredText)
SAMPLE_BYTES = 96
SAMPLE_SEED = 0
SAMPLE_TEMPERATURE = 0.8


@functools.lru_cache(maxsize=8)
def _next_byte_fn(apply_fn):
  """One compiled program per model: the byte after position `last` of `window`, greedy at temperature 0."""
  @jax.jit
  def next_byte(variables, window, last, key, temperature):
    logits = apply_fn(variables, window)[0, last].astype(jnp.float32)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits))
  return next_byte


def generate(apply_fn, variables, prompt: bytes, *, num_bytes: int, seq_len: int, temperature: float = 0.0,
             seed: int = SAMPLE_SEED) -> bytes:
  """`num_bytes` bytes continuing `prompt`: greedy (`temperature` 0) or sampled from softmax(logits /
  temperature) with `jax.random.PRNGKey(seed)` split per byte. The context is the last `seq_len` bytes, right-
  padded to seq_len (causal: the padding does not change the logits read at the last real position), so one
  program serves every step. `apply_fn(variables, tokens [1, seq_len])` -> logits [1, seq_len, vocab]."""

  out, key = list(prompt), jax.random.PRNGKey(seed)
  for _ in range(num_bytes):
    context = out[-seq_len:]
    window = jnp.asarray([context + [0] * (seq_len - len(context))], jnp.int32)
    key, sub = jax.random.split(key)
    out.append(int(_next_byte_fn(apply_fn)(variables, window, len(context) - 1, sub, jnp.float32(temperature))))
  return bytes(out[len(prompt):])


def samples(apply_fn, variables, *, seq_len: int) -> dict[str, str]:
  """{'greedy | <prompt>': text, 't=0.8 | <prompt>': text} for each of `PROMPTS` (fixed prompts and seed)."""
  out = {}
  for prompt in PROMPTS:
    for name, temperature in (('greedy', 0.0), (f't={SAMPLE_TEMPERATURE:g}', SAMPLE_TEMPERATURE)):
      text = generate(apply_fn, variables, prompt.encode(), num_bytes=SAMPLE_BYTES, seq_len=seq_len,
                      temperature=temperature)
      out[f'{name} | {prompt}'] = prompt + text.decode('utf-8', errors='replace')
  return out
