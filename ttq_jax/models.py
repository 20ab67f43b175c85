"""The paper's models as plain Flax modules, named as in the authors' code; rules make them ternary.

Every model here is written with `nn.Conv` / `nn.Dense` only. `create_model` makes it ternary the way
any user model is made ternary (`quant.quantize` with path rules): the layers whose module path matches
`full_precision` stay full precision, every other layer with a kernel is ternary. `'edges'` means the
model's first and last layer (`EDGE_LAYERS`), the layout of the paper's AlexNet and ResNet-18 rows; the
official CIFAR code kept only `conv0` full precision and made the last layer (`linear`) ternary.
Batch norm parameters and biases are never quantized.

Module names follow the authors' scripts (`conv0`, `res2_0/conv1`, `bnlast`, `linear`; AlexNet `conv0`..
`conv4`, `fc0`, `fc1`, `fct`), with `_` for their `.`, so a path rule reads like the official code.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttq_jax.errors import ConfigError
from ttq_jax.lm import LMDecoder
from ttq_jax.lm_nnx import LMDecoderNNX
from ttq_jax.vit import ViT
from ttq_jax.quant import QuantConfig, Rule, quantize

ModuleDef = Any
BN_MOMENTUM = 0.9  # tensorpack `decay=0.9`; torch `momentum=0.1`

# Initialisers of the reference code. tensorpack's CIFAR `conv()`: N(0, sqrt(2 / (9 * out))), i.e. He
# fan-out; tensorpack `FullyConnected`: uniform_unit_scaling(factor=1.43); tensorpack `Conv2D`: Glorot
# uniform; fb.resnet.torch: He fan-out normal convs, torch-default uniform(+-1/sqrt(fan_in)) linear.
HE_FAN_OUT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
TENSORPACK_FC = nn.initializers.variance_scaling(1.43**2, 'fan_in', 'uniform')
GLOROT_UNIFORM = nn.initializers.glorot_uniform()
TORCH_LINEAR = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _tf0_default_uniform(key, shape, dtype=jnp.float32):
  """TF 0.x `get_variable`'s default initializer, `uniform_unit_scaling_initializer()`: U(-m, m) with
  m = sqrt(3 / prod(shape[:-1])), so U(-sqrt(3), sqrt(3)) for a 1-D variable (tensorpack's BN `beta`)."""
  m = (3.0 / max(1.0, float(np.prod(shape[:-1])))) ** 0.5
  return jax.random.uniform(key, shape, dtype, -m, m)


# model.bn_bias_init -> the initializer of BN's bias (beta)
BN_BIAS_INITS: dict[str, Callable[..., jax.Array]] = {
    'zeros': nn.initializers.zeros,                 # Flax / torch
    'uniform_unit_scaling': _tf0_default_uniform,   # tensorpack's BatchNorm (`beta` without an initializer, TF 0.x)
}


class BatchNorm(nn.Module):
  """Batch norm with optional ghost batches: statistics per group of `ghost_batch_size` examples (as each
  GPU of the official multi-GPU runs normalised its own share of the batch); 0 = the whole batch.

  Same variables as `nn.BatchNorm` (`scale`, `bias`; `batch_stats` `mean`, `var`). The running averages
  take the mean over the groups of their means and (biased) variances.

  unbiased_variance: in training, normalise with the group's variance x N / (N - 1), N the examples of
    the group (tensorpack's `BatchNorm`, which the official code uses; its moving average keeps the
    biased variance, as here). False: the biased variance (Flax, torch).
  bias_init: a key of `BN_BIAS_INITS` ('zeros'; 'uniform_unit_scaling' as tensorpack's beta).
  """

  use_running_average: bool
  momentum: float = BN_MOMENTUM
  epsilon: float = 1e-5
  ghost_batch_size: int = 0
  unbiased_variance: bool = False
  bias_init: str = 'zeros'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', BN_BIAS_INITS[self.bias_init], (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = (xf - mean) * (scale * jnp.reciprocal(jnp.sqrt(var + self.epsilon))) + bias
      return y.astype(self.dtype)
    batch = x.shape[0]
    group = self.ghost_batch_size if 0 < self.ghost_batch_size < batch else batch
    if batch % group:
      raise ConfigError(f'model.bn_ghost_batch_size={self.ghost_batch_size} does not divide the batch of '
                        f'{batch} examples: allowed are divisors of the batch (or 0 = the whole batch)')
    xg = xf.reshape(batch // group, group, *x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(xg), axes, keepdims=True) - jnp.square(mean), 0.0)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean.reshape(-1, features), 0)
      ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var.reshape(-1, features), 0)
    if self.unbiased_variance and group > 1:
      var = var * (group / (group - 1))
    y = (xg - mean) * (scale * jnp.reciprocal(jnp.sqrt(var + self.epsilon))) + bias
    return y.reshape(x.shape).astype(self.dtype)


def _norm(model: nn.Module, train: bool):
  """The model's batch norm: its `bn_epsilon`, `ghost_batch_size`, `bn_unbiased_variance`, `bn_bias_init`."""
  return functools.partial(BatchNorm, use_running_average=not train, epsilon=model.bn_epsilon,
                           ghost_batch_size=model.ghost_batch_size, unbiased_variance=model.bn_unbiased_variance,
                           bias_init=model.bn_bias_init, dtype=model.dtype)


class PreActBlock(nn.Module):
  """Pre-activation basic block as in the official `residual()`: bn1-relu-conv1-bn2-relu-conv2 plus the
  shortcut. The first block of the network has no bn1: it takes the stem's activated output (`first`).
  A block that changes the shape averages 2x2 windows and zero-pads the channels on both sides."""

  features: int
  strides: int
  first: bool
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False, kernel_init=HE_FAN_OUT, dtype=self.dtype)
    b1 = x if self.first else nn.relu(self.norm(name='bn1')(x))
    y = conv(self.features, strides=self.strides, name='conv1')(b1)
    y = nn.relu(self.norm(name='bn2')(y))
    y = conv(self.features, name='conv2')(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = nn.avg_pool(x, (self.strides, self.strides), strides=(self.strides, self.strides))
      pad = self.features - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    return y + shortcut


class CifarPreActResNet(nn.Module):
  """Pre-activation ResNet-(6n+2) of the official `tw-cifar10-resnet.py`: conv0-bn0-relu, stages
  `res1`..`res3` of n blocks (16/32/64 channels), bnlast-relu, global average pool, `linear`."""

  num_blocks: int
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  bn_epsilon: float = 1e-5
  ghost_batch_size: int = 0
  bn_unbiased_variance: bool = False
  bn_bias_init: str = 'zeros'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = _norm(self, train)
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False, kernel_init=HE_FAN_OUT, dtype=self.dtype,
                name='conv0')(x.astype(self.dtype))
    x = nn.relu(norm(name='bn0')(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = PreActBlock(width, strides, first=stage == 0 and block == 0, norm=norm, dtype=self.dtype,
                        name=f'res{stage + 1}_{block}')(x)
    x = nn.relu(norm(name='bnlast')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=TENSORPACK_FC, dtype=self.dtype,
                    name='linear')(x).astype(jnp.float32)


class BasicBlock(nn.Module):
  """ResNet v1 basic block (fb.resnet.torch): conv1-bn1-relu-conv2-bn2, plus a 1x1 projection
  (`downsample_conv`, `downsample_bn`) when the shape changes (shortcut type B)."""

  features: int
  strides: int
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=HE_FAN_OUT, dtype=self.dtype)
    y = conv(self.features, (3, 3), strides=self.strides, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = conv(self.features, (3, 3), name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = conv(self.features, (1, 1), strides=self.strides, name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ImageNet ResNet (He et al. 2016) as fb.resnet.torch builds it; ResNet-18 = stage sizes (2, 2, 2, 2).
  Names as torchvision: conv1, bn1, layer{1..4}_{k}, fc."""

  stage_sizes: Sequence[int]
  num_classes: int
  width: int = 64
  bn_epsilon: float = 1e-5
  ghost_batch_size: int = 0
  bn_unbiased_variance: bool = False
  bn_bias_init: str = 'zeros'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = _norm(self, train)
    x = nn.Conv(self.width, (7, 7), strides=2, padding=[(3, 3), (3, 3)], use_bias=False, kernel_init=HE_FAN_OUT,
                dtype=self.dtype, name='conv1')(x.astype(self.dtype))
    x = nn.relu(norm(name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
    for stage, size in enumerate(self.stage_sizes):
      for block in range(size):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * 2**stage, strides, norm=norm, dtype=self.dtype,
                       name=f'layer{stage + 1}_{block}')(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=TORCH_LINEAR, dtype=self.dtype, name='fc')(x).astype(jnp.float32)


class AlexNet(nn.Module):
  """AlexNet of the official `tw-imagenet-alexnet.py` (DoReFa-Net variant: batch norm, no dropout, grouped
  convs, no biases but the last layer's; BN epsilon 1e-4).

  conv0 96x12x12/4 VALID, relu -> conv1 (256, 5x5, groups 2), bn1, pool1 -> conv2 (384), bn2, pool2 ->
  conv3 (384, groups 2), bn3 -> conv4 (256, groups 2), bn4, pool4 (VALID) -> fc0, bnfc0 -> fc1, bnfc1 ->
  fct (with bias). 224x224 inputs.
  """

  num_classes: int = 1000
  width_multiplier: float = 1.0
  bn_epsilon: float = 1e-4
  ghost_batch_size: int = 0
  bn_unbiased_variance: bool = False
  bn_bias_init: str = 'zeros'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = _norm(self, train)
    c = lambda n: max(2, int(round(n * self.width_multiplier)) // 2 * 2)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=GLOROT_UNIFORM, dtype=self.dtype)
    dense = functools.partial(nn.Dense, use_bias=False, kernel_init=TENSORPACK_FC, dtype=self.dtype)
    pool = lambda x, padding: nn.max_pool(x, (3, 3), (2, 2), padding=padding)
    x = nn.relu(conv(c(96), (12, 12), strides=4, padding='VALID', name='conv0')(x.astype(self.dtype)))
    x = conv(c(256), (5, 5), feature_group_count=2, name='conv1')(x)
    x = nn.relu(pool(norm(name='bn1')(x), 'SAME'))
    x = conv(c(384), (3, 3), name='conv2')(x)
    x = nn.relu(pool(norm(name='bn2')(x), 'SAME'))
    x = nn.relu(norm(name='bn3')(conv(c(384), (3, 3), feature_group_count=2, name='conv3')(x)))
    x = conv(c(256), (3, 3), feature_group_count=2, name='conv4')(x)
    x = nn.relu(pool(norm(name='bn4')(x), 'VALID'))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(norm(name='bnfc0')(dense(c(4096), name='fc0')(x)))
    x = nn.relu(norm(name='bnfc1')(dense(c(4096), name='fc1')(x)))
    return nn.Dense(self.num_classes, kernel_init=TENSORPACK_FC, dtype=self.dtype,
                    name='fct')(x).astype(jnp.float32)


# name -> constructor with its fixed arguments. Widths / depths follow the paper.
MODELS: dict[str, Callable[..., nn.Module | nnx.Module]] = {
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
    'lm_decoder': LMDecoder,  # byte-level LLaMA-style decoder (ttq_jax.lm); sizes from model.depth, width, ...
    'lm_decoder_nnx': LMDecoderNNX,  # the same decoder in Flax NNX (ttq_jax.lm_nnx)
}
# config.model keys that set a model's size where its constructor has that field (0 / '': the model's own)
SIZE_KEYS = ('depth', 'width', 'num_heads', 'mlp_width', 'activation')

# Each model's first and last layer (module paths): what `full_precision='edges'` keeps full precision.
_CIFAR_EDGES, _ALEXNET_EDGES, _VIT_EDGES = 'conv0|linear', 'conv0|fct', 'embed|head'
EDGE_LAYERS = {'resnet20': _CIFAR_EDGES, 'resnet32': _CIFAR_EDGES, 'resnet44': _CIFAR_EDGES,
               'resnet56': _CIFAR_EDGES, 'resnet_tiny': _CIFAR_EDGES, 'resnet18': 'conv1|fc',
               'alexnet': _ALEXNET_EDGES, 'alexnet_tiny': _ALEXNET_EDGES, 'vit_small': _VIT_EDGES,
               'vit_tiny': _VIT_EDGES, 'lm_decoder': 'embed|head', 'lm_decoder_nnx': 'embed|head'}
EDGES = 'edges'

# Smallest square input a model can take: AlexNet's 12x12/4 VALID stem, two stride-2 pools and a 3x3/2
# VALID pool leave no pixels below 44x44.
MIN_IMAGE_SIZE = {'alexnet': 44, 'alexnet_tiny': 44}


def full_precision_regex(name: str, full_precision: str) -> str:
  """The module-path regex of the layers kept full precision ('edges' = the model's first and last)."""
  return EDGE_LAYERS[name] if full_precision == EDGES else full_precision


def create_model(name: str, *, num_classes: int, quant: QuantConfig, full_precision: str = EDGES,
                 ghost_batch_size: int = 0, bn_unbiased_variance: bool = False, bn_bias_init: str = 'zeros',
                 dtype: Any = jnp.float32, sizes: dict | None = None, seed: int = 0) -> nn.Module | nnx.Module:
  """Builds model `name`; with a quantizing `quant`, every layer with a kernel is ternary except those whose
  module path matches `full_precision` (a regex over whole paths; 'edges' = `EDGE_LAYERS[name]`; '' = none).
  The `bn_*` settings and `ghost_batch_size` apply to models with batch norm (see `BatchNorm`); `sizes`
  ({SIZE_KEYS key: value}, 0 / '' = the model's own) to models with those fields. An NNX model is constructed
  (and so initialised) with `nnx.Rngs(seed)`. `num_classes` (the dataset's outputs per example or position) is
  passed as the model's `vocab_size` for a language model.
  """
  if name not in MODELS:
    raise ConfigError(f'model.name={name!r} is unknown: allowed are {", ".join(sorted(MODELS))}')
  ctor = MODELS[name]
  cls = ctor.func if isinstance(ctor, functools.partial) else ctor
  fields = ({f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls)
            else set(inspect.signature(cls.__init__).parameters))  # an NNX module: its constructor's arguments
  if ghost_batch_size and 'ghost_batch_size' not in fields:
    raise ConfigError(f'model.bn_ghost_batch_size={ghost_batch_size} needs a model with batch norm; {name!r} has '
                      'none: allowed is 0')
  if 'ghost_batch_size' in fields:
    kwargs = dict(ghost_batch_size=ghost_batch_size, bn_unbiased_variance=bn_unbiased_variance, bn_bias_init=bn_bias_init)
  else:
    if bn_unbiased_variance or bn_bias_init != 'zeros':
      raise ConfigError(f'model.bn_unbiased_variance / model.bn_bias_init need a model with batch norm; {name!r} has '
                        "none: allowed are false / 'zeros'")
    kwargs = {}
  for key, value in (sizes or {}).items():
    if value and key not in fields:
      raise ConfigError(f'model.{key}={value!r} does not apply to model {name!r} (it has no field {key}): allowed is '
                        f'{"0" if isinstance(value, int) else "an empty string"}')
    if value:
      kwargs[key] = value
  if 'rngs' in fields:  # an NNX model: initialised here
    kwargs['rngs'] = nnx.Rngs(seed)
  # the model's output size under its own name: classes, or a language model's vocabulary
  outputs = 'vocab_size' if 'vocab_size' in fields else 'num_classes'
  model = ctor(**{outputs: num_classes}, dtype=dtype, **kwargs)
  if not quant.quantized:
    return model
  keep = full_precision_regex(name, full_precision)
  rules = [Rule(module_path=keep, method='fp')] if keep else []
  return quantize(model, rules + [Rule(module_path='.*', **dataclasses.asdict(quant))])
