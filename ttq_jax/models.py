"""Models of the TTQ paper, each taking its conv / dense layer classes as arguments.

`conv`/`dense` are used for every quantizable layer; `stem_conv`/`head_dense` for the first
convolution and last dense layer, which the paper keeps full precision (Sec. 5.2; `nn.Conv`/`nn.Dense`
by default in `create_model`). Passing
`TernaryConv` with `QuantConfig(method='fp' | 'ttq' | 'twn')` makes full precision, TTQ and TWN
one model with a different layer. Batch norm and biases are never quantized.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ttq_jax.errors import ConfigError
from ttq_jax.quant import QuantConfig, Rule, TernaryConv, TernaryDense, quantize

ModuleDef = Any
BN_MOMENTUM = 0.9


def _batch_norm(train: bool, dtype):
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5,
                           dtype=dtype)


class PreActBlock(nn.Module):
  """Pre-activation basic block (He et al. 2016b) with option-A shortcut (subsample + zero-pad)."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    out = nn.relu(self.norm()(x))
    y = self.conv(self.features, (3, 3), strides=self.strides, use_bias=False)(out)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3), use_bias=False)(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = x[:, ::self.strides, ::self.strides, :]
      pad = self.features - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    return y + shortcut


class CifarPreActResNet(nn.Module):
  """Pre-activation ResNet-(6n+2) for 32x32 (or 28x28) images: 16/32/64 channels, n blocks each."""

  num_blocks: int
  num_classes: int
  conv: ModuleDef = TernaryConv
  stem_conv: ModuleDef = TernaryConv
  head_dense: ModuleDef = TernaryDense
  widths: Sequence[int] = (16, 32, 64)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = _batch_norm(train, self.dtype)
    conv = functools.partial(self.conv, dtype=self.dtype)
    x = self.stem_conv(self.widths[0], (3, 3), use_bias=False, dtype=self.dtype)(x.astype(self.dtype))
    for stage, width in enumerate(self.widths):
      for block in range(self.num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = PreActBlock(width, strides, conv=conv, norm=norm)(x)
    x = nn.relu(norm()(x))
    x = jnp.mean(x, axis=(1, 2))
    return self.head_dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class BasicBlock(nn.Module):
  """ResNet v1 basic block with a 1x1 projection shortcut when the shape changes."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), strides=self.strides, use_bias=False)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3), use_bias=False)(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = self.conv(self.features, (1, 1), strides=self.strides, use_bias=False)(x)
      x = self.norm()(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ImageNet ResNet (He et al. 2016) with basic blocks; ResNet-18 = stage sizes (2, 2, 2, 2)."""

  stage_sizes: Sequence[int]
  num_classes: int
  conv: ModuleDef = TernaryConv
  stem_conv: ModuleDef = TernaryConv
  head_dense: ModuleDef = TernaryDense
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = _batch_norm(train, self.dtype)
    conv = functools.partial(self.conv, dtype=self.dtype)
    x = self.stem_conv(self.width, (7, 7), strides=2, padding=[(3, 3), (3, 3)], use_bias=False,
                       dtype=self.dtype)(x.astype(self.dtype))
    x = nn.relu(norm()(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, conv=conv, norm=norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.head_dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class AlexNet(nn.Module):
  """AlexNet as TTQ trains it (DoReFa-Net variant: batch norm, no dropout, grouped convs).

  conv0 96x12x12/4 (full precision) -> conv1-4 (256, 384, 384, 256; groups 2/1/2/2) with BN and
  3x3/2 max pools -> fc0, fc1 (4096, BN) -> fct (full precision). 224x224 inputs.
  """

  num_classes: int = 1000
  conv: ModuleDef = TernaryConv
  dense: ModuleDef = TernaryDense
  stem_conv: ModuleDef = TernaryConv
  head_dense: ModuleDef = TernaryDense
  width_multiplier: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = _batch_norm(train, self.dtype)
    c = lambda n: max(2, int(round(n * self.width_multiplier)) // 2 * 2)
    conv = functools.partial(self.conv, dtype=self.dtype, use_bias=False)
    dense = functools.partial(self.dense, dtype=self.dtype, use_bias=False)
    x = self.stem_conv(c(96), (12, 12), strides=4, padding='VALID', dtype=self.dtype)(x.astype(self.dtype))
    x = nn.relu(x)
    x = conv(c(256), (5, 5), feature_group_count=2)(x)
    x = nn.relu(nn.max_pool(norm()(x), (3, 3), (2, 2), padding='SAME'))
    x = conv(c(384), (3, 3))(x)
    x = nn.relu(nn.max_pool(norm()(x), (3, 3), (2, 2), padding='SAME'))
    x = nn.relu(norm()(conv(c(384), (3, 3), feature_group_count=2)(x)))
    x = conv(c(256), (3, 3), feature_group_count=2)(x)
    x = nn.relu(nn.max_pool(norm()(x), (3, 3), (2, 2), padding='VALID'))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(norm()(dense(c(4096))(x)))
    x = nn.relu(norm()(dense(c(4096))(x)))
    return self.head_dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


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


# name -> (constructor, its fixed arguments). Widths / depths follow the paper.
MODELS: dict[str, Callable[..., nn.Module]] = {
    'resnet20': functools.partial(CifarPreActResNet, num_blocks=3),
    'resnet32': functools.partial(CifarPreActResNet, num_blocks=5),
    'resnet44': functools.partial(CifarPreActResNet, num_blocks=7),
    'resnet56': functools.partial(CifarPreActResNet, num_blocks=9),
    'resnet_tiny': functools.partial(CifarPreActResNet, num_blocks=1, widths=(4, 8, 8)),  # tests only
    'resnet18': functools.partial(ResNet, stage_sizes=(2, 2, 2, 2)),
    'alexnet': AlexNet,
    'alexnet_tiny': functools.partial(AlexNet, width_multiplier=1 / 16),  # tests only
    'vit_small': functools.partial(ViT, patch=4, width=64, depth=4, num_heads=4, mlp_ratio=2),
    'vit_tiny': functools.partial(ViT, patch=7, width=16, depth=1, num_heads=2, mlp_ratio=2),  # tests only
}

# Plain Flax models made ternary by path rules: the regex of the layers the paper keeps full precision
# (first and last); every other layer with a kernel is ternary.
RULE_MODELS = {'vit_small': 'embed|head', 'vit_tiny': 'embed|head'}


# Smallest square input a model can take: AlexNet's 12x12/4 VALID stem, two stride-2 pools and a 3x3/2
# VALID pool leave no pixels below 44x44.
MIN_IMAGE_SIZE = {'alexnet': 44, 'alexnet_tiny': 44}


def create_model(name: str, *, num_classes: int, quant: QuantConfig, quantize_first_last: bool = False,
                 dtype: Any = jnp.float32) -> nn.Module:
  """Builds a model whose body layers quantize with `quant`; first/last full precision by default."""
  if name not in MODELS:
    raise ConfigError(f'model.name={name!r} is unknown: allowed are {", ".join(sorted(MODELS))}')
  if name in RULE_MODELS:
    model = MODELS[name](num_classes=num_classes, dtype=dtype)
    if not quant.quantized:
      return model
    rules = [] if quantize_first_last else [Rule(module_path=RULE_MODELS[name], method='fp')]
    return quantize(model, rules + [Rule(module_path='.*', **dataclasses.asdict(quant))])
  conv = functools.partial(TernaryConv, quant=quant)
  dense = functools.partial(TernaryDense, quant=quant)
  # Full-precision edges are plain nn.Conv / nn.Dense (same maths as the 'fp' ternary layers); which
  # layers are ternary is read from the module tree (quant.ternary_layers), not from these names.
  stem, head = (conv, dense) if quantize_first_last else (nn.Conv, nn.Dense)
  layers = {'conv': conv, 'dense': dense, 'stem_conv': stem, 'head_dense': head}
  ctor = MODELS[name]
  fields = {f.name for f in dataclasses.fields(ctor.func if isinstance(ctor, functools.partial) else ctor)}
  return ctor(num_classes=num_classes, dtype=dtype, **{k: v for k, v in layers.items() if k in fields})
