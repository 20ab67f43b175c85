"""`ViT`: a small Vision Transformer (Dosovitskiy et al. 2021) in plain Flax (`model.name='vit_small'`), made
ternary by rules (`quant.quantize`), not by its layer classes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class EncoderBlock(nn.Module):
  """Pre-norm transformer encoder block: self-attention (`attn/query|key|value|out`, DenseGeneral) and an
  MLP (`mlp_in`, `mlp_out`), each with a residual."""

  width: int
  num_heads: int
  mlp_ratio: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(dtype=self.dtype, name='norm_attn')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, name='attn')(y, y)
    y = nn.LayerNorm(dtype=self.dtype, name='norm_mlp')(x)
    y = nn.gelu(nn.Dense(self.width * self.mlp_ratio, dtype=self.dtype, name='mlp_in')(y))
    return x + nn.Dense(self.width, dtype=self.dtype, name='mlp_out')(y)


class ViT(nn.Module):
  """A small Vision Transformer (Dosovitskiy et al. 2021) written with plain Flax layers: patch embedding
  `embed` (a conv with stride = patch), learned position embeddings, `depth` pre-norm encoder blocks
  `block_i`, mean pooling, `head`. Made ternary by rules (`quant.quantize`), not by its layer classes."""

  num_classes: int
  patch: int = 4
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # no dropout or batch norm
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding='VALID', dtype=self.dtype,
                name='embed')(x.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    x = x + self.param('pos_embedding', nn.initializers.normal(0.02), (1, x.shape[1], self.width)).astype(self.dtype)
    for i in range(self.depth):
      x = EncoderBlock(self.width, self.num_heads, self.mlp_ratio, self.dtype, name=f'block_{i}')(x)
    x = nn.LayerNorm(dtype=self.dtype, name='norm')(x).mean(axis=1)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)
