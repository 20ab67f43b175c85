"""`quantize(model, rules)` for Flax NNX models: the same rules, methods and kernels as for Linen (`rules.py`).

    model = quantize(Net(nnx.Rngs(0)), [Rule(module_path='stem|head', method='fp'), Rule(module_path='.*')])
    nnx.state(model, nnx.Param)        # the plain model's params + each method's scales beside the kernels

A layer's path is its NNX attribute path, names and list indices joined by '/' (`blocks/0/mlp/up` for a layer
in an `nnx.List`, as `nnx.iter_modules` yields it); the first rule whose `module_path` matches the whole path
decides, as for Linen. Layers that can be ternary: `nnx.Linear`, `nnx.LinearGeneral` (so
`nnx.MultiHeadAttention`), `nnx.Conv` (1-3-D, grouped), `nnx.ConvTranspose`, `nnx.Einsum`; an `nnx.Embed`
selected by a quantizing rule is refused, and so is any other layer with a `kernel` that a rule selects.

How: `quantize` returns a copy of the model (the one given is unchanged) in which each selected layer keeps its
path and its own attributes (`kernel`, `bias`), gains its method's trained scales as `nnx.Param` attributes
(`METHODS[method].scale_names`: `w_p` / `w_n` for TTQ, `alpha` for ParetoQ; shape () per tensor, (out,) per
output channel; initialised as at Linen's `model.init`), and computes with `rules.ternary_kernel` of its latent
kernel: during the layer's call its `kernel` holds the ternary kernel (so `nnx.grad` reaches the latent kernel and
the scales through the method's custom gradient) and the latent kernel again afterwards. The input of a layer with
`activations='int8'` is quantized as for Linen. So every formula is the Linen path's.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Any, Sequence

import jax.numpy as jnp
from flax import nnx

from ttq_jax.quant.methods import ACTIVATIONS
from ttq_jax.quant.rules import (Rule, TernaryLayer, einsum_input_axes, einsum_output_axes, first_rule, granular_shapes,
                                 ternary_kernel)

KERNEL_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum)


def is_nnx(model) -> bool:
  return isinstance(model, nnx.Module)


def layer_path(path) -> str:
  return '/'.join(str(p) for p in path)


def output_axes(module: nnx.Module, kernel_ndim: int) -> tuple[int, ...]:
  """The kernel axes that index output features."""
  if isinstance(module, nnx.Einsum):
    return einsum_output_axes(module.einsum_str)
  if isinstance(module, nnx.LinearGeneral):
    return tuple(range(kernel_ndim - len(module.out_features), kernel_ndim))
  return (kernel_ndim - 1,)


def input_axes(module: nnx.Module, x_ndim: int) -> tuple[int, ...]:
  """The axes of a layer's input that its kernel contracts (as `rules.input_axes` for Linen)."""
  if isinstance(module, nnx.Einsum):
    return einsum_input_axes(module.einsum_str, x_ndim)
  if isinstance(module, nnx.LinearGeneral):
    return tuple(sorted(a % x_ndim for a in module.axis))
  return (x_ndim - 1,)


_FULL_PRECISION = contextvars.ContextVar('ttq_nnx_full_precision', default=False)


@contextlib.contextmanager
def full_precision():
  """Inside: every selected layer computes as its plain layer (latent kernel, float input): the full-precision
  twin of a quantized model with the same state (the FP warm-up)."""
  token = _FULL_PRECISION.set(True)
  try:
    yield
  finally:
    _FULL_PRECISION.reset(token)


def _ternary_call(self, *args, **kwargs):
  """The call of a selected layer: its input quantized when the rule says so, its kernel ternary during the call."""
  rule, shape, base = self.ttq_rule, self.ttq_scale_shape, type(self).__mro__[1]
  if _FULL_PRECISION.get():
    return base.__call__(self, *args, **kwargs)
  quantize_input = ACTIVATIONS[rule.activations]
  if quantize_input is not None:  # the layer's input: its first argument, or `inputs=`
    if args:
      args = (quantize_input(args[0], input_axes(self, jnp.ndim(args[0]))),) + tuple(args[1:])
    else:
      kwargs = dict(kwargs, inputs=quantize_input(kwargs['inputs'], input_axes(self, jnp.ndim(kwargs['inputs']))))
  if not rule.quantized:
    return base.__call__(self, *args, **kwargs)
  latent = self.kernel.get_value()
  scales = {n: jnp.reshape(getattr(self, n).get_value(), shape) for n in rule.spec.scale_names}
  self.kernel.set_value(ternary_kernel(latent, scales, rule, shape))
  try:
    return base.__call__(self, *args, **kwargs)
  finally:
    self.kernel.set_value(latent)


_TERNARY_CLASSES: dict[type, type] = {}


def _ternary_class(base: type) -> type:
  """One subclass per layer class (NNX graph definitions compare classes): `base` with `_ternary_call`."""
  if base not in _TERNARY_CLASSES:
    _TERNARY_CLASSES[base] = type(f'Ternary{base.__name__}', (base,), {'__call__': _ternary_call,
                                                                       '__module__': base.__module__})
  return _TERNARY_CLASSES[base]


def quantize(model: nnx.Module, rules: Sequence[Rule]) -> nnx.Module:
  """A copy of the NNX `model` whose layers that `rules` select compute as their rule says (see the module doc);
  `model` itself is left unchanged."""
  model = nnx.clone(model)
  rules, selected, layers = tuple(rules), set(), []
  for path, module in list(nnx.iter_modules(model)):
    name = layer_path(path)
    if isinstance(module, (nnx.Embed,) + KERNEL_LAYERS):
      layers.append(name)
    rule = first_rule(rules, name)
    if rule is None:
      continue
    if isinstance(module, nnx.Embed):
      if rule.quantized or rule.activations != 'float':
        raise ValueError(f'Rule(module_path={rule.module_path!r}, method={rule.method!r}) selects the nnx.Embed at '
                         f'{name!r}: embedding tables cannot be ternary; layers with a kernel can: '
                         f'{", ".join("nnx." + c.__name__ for c in KERNEL_LAYERS)} (an \'fp\' rule may select it)')
      selected.add(rule)
      continue
    if not isinstance(module, KERNEL_LAYERS):
      if isinstance(getattr(module, 'kernel', None), nnx.Param) and (rule.quantized or rule.activations != 'float'):
        raise ValueError(f'Rule(module_path={rule.module_path!r}) selects {type(module).__name__} at {name!r}, a layer '
                         f'with a kernel that cannot be made ternary: allowed are '
                         f'{", ".join("nnx." + c.__name__ for c in KERNEL_LAYERS)}')
      continue  # a container: its layers are looked at one by one
    selected.add(rule)
    if not rule.quantized and rule.activations == 'float':
      continue  # an 'fp' rule asks for nothing
    kernel = jnp.asarray(module.kernel.get_value(), jnp.float32)
    stored, broadcast = granular_shapes(kernel.shape, output_axes(module, kernel.ndim), rule.scale_granularity)
    for scale, value in rule.spec.initial_scales(kernel, rule, broadcast).items():
      setattr(module, scale, nnx.Param(jnp.reshape(value, stored).astype(jnp.float32)))
    module.ttq_rule, module.ttq_scale_shape = rule, broadcast
    module.__class__ = _ternary_class(type(module))
  unused = [r.module_path for r in rules if r not in selected]
  if unused:
    warnings.warn(f'quantize: rules that selected no layer: {", ".join(repr(u) for u in unused)} (the model\'s layer '
                  f'paths: {", ".join(sorted(layers)) or "none"})', stacklevel=3)
  return model


def ternary_layers(model: nnx.Module) -> tuple[TernaryLayer, ...]:
  """Every layer of the NNX `model` whose kernel is ternary, sorted by path (as `rules.ternary_layers`)."""
  return tuple(sorted(TernaryLayer(layer_path(path), module.ttq_rule, module.ttq_scale_shape)
                      for path, module in nnx.iter_modules(model)
                      if getattr(module, 'ttq_rule', None) is not None and module.ttq_rule.quantized))


def pure(state) -> dict[str, Any]:
  """An NNX state as a nested dict of arrays with string keys (list indices as '0', '1', ...)."""
  def strings(tree):
    return {str(k): strings(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
  return strings(nnx.to_pure_dict(state))


def params(model: nnx.Module) -> dict[str, Any]:
  """The model's `nnx.Param`s as `pure` writes them: the tree the reports (`quant.ternary_weights`,
  `layer_reports`, ...) read with `ternary_layers(model)`."""
  return pure(nnx.state(model, nnx.Param))


def unquantize(model: nnx.Module) -> nnx.Module:
  """A copy of the plain model a `quantize`d NNX model was made from: its layers' own classes, no scales."""
  model = nnx.clone(model)
  for _, module in nnx.iter_modules(model):
    rule = getattr(module, 'ttq_rule', None)
    if rule is None:
      continue
    for scale in rule.spec.scale_names if rule.quantized else ():
      delattr(module, scale)
    del module.ttq_rule, module.ttq_scale_shape
    module.__class__ = type(module).__mro__[1]
  return model


def activation_modes(model: nnx.Module) -> dict[str, str]:
  """{layer path: `activations`} of the layers whose input is quantized ('int8'), whatever their method."""
  return {layer_path(path): module.ttq_rule.activations for path, module in nnx.iter_modules(model)
          if getattr(module, 'ttq_rule', None) is not None and module.ttq_rule.activations != 'float'}
