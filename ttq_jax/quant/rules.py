"""TTQ for any Flax model: `quantize(model, rules)` ternarizes the kernels of the layers that path rules
select, without touching the model's code (the qwix idea, with the paper's trained quantizer).

    model = quantize(MyViT(), [Rule(module_path=r'.*(attention|mlp)/.*'), Rule(module_path='head', method='fp')])
    variables = model.init(rng, x)     # the plain model's variables + the method's scales beside each ternary kernel

A layer is selected by its module path (slash-joined names, as in the params tree, e.g.
`encoder/block_0/attention/query`): the first rule whose `module_path` regex matches the whole path
decides, a layer that no rule matches stays full precision. Layers with a `kernel` parameter can be
ternary: `nn.Dense`, `nn.DenseGeneral` (and so `nn.MultiHeadDotProductAttention`), `nn.Conv` (1-D to
3-D, any padding, dilation and feature groups), `nn.ConvTranspose` and `nn.Einsum`. An `nn.Embed` table
selected by a quantizing rule is refused (an 'fp' rule may select it): an embedding lookup is not a matrix
product; quantizing it is not the paper's method. Biases and normalisation parameters are never quantized.

How: during the model's `__call__`, a Flax method interceptor gives each selected layer a `param`
that returns the ternary kernel of the rule's method (`METHODS[method].kernel`: for 'ttq' the paper's
custom_vjp with the layer's own `w_p` / `w_n`) computed from the float32 latent kernel, and with
`activations='int8'` quantizes the layer's input; everything else about the layer is unchanged. So the
params tree is the plain model's tree plus the trained scales (`METHODS[method].scale_names`: `w_p` / `w_n`
for ttq, `alpha` for paretoq, none for twn / bitnet), and a full-precision checkpoint
of the plain model loads into it as it is (the paper's fine-tuning recipe).
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import warnings
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from ttq_jax import paths
from ttq_jax.quant.config import QuantConfig
from ttq_jax.quant.methods import ACTIVATIONS
# Layers whose `kernel` parameter is their weight matrix (output features on the kernel's last axes,
# except for Einsum, whose output axes the equation names).
KERNEL_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.Einsum)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule(QuantConfig):
  """Which layers (`module_path`, a regex over the whole slash-joined module path) and how (the
  `QuantConfig` fields: method, threshold, t, k, sparsity, w_p_init, w_n_init, positive_scales, activations,
  scale_granularity)."""

  module_path: str = '.*'

  def __post_init__(self):
    super().__post_init__()
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise ValueError(f'Rule.module_path={self.module_path!r} is not a regex: {e}') from None

  def matches(self, path: str) -> bool:
    return paths.matches(self.module_path, path)


def first_rule(rules: Sequence[Rule], path: str) -> Rule | None:
  return next((r for r in rules if r.matches(path)), None)


def einsum_output_axes(einsum_str: str) -> tuple[int, ...]:
  """The axes of an einsum's kernel (its second operand) that its output keeps."""
  inputs, output = einsum_str.replace(' ', '').split('->')
  return tuple(i for i, c in enumerate(inputs.split(',')[1]) if c in output)


def einsum_input_axes(einsum_str: str, x_ndim: int) -> tuple[int, ...]:
  """The axes of an einsum's input (its first operand, of `x_ndim` dims) that it contracts."""
  inputs, output = einsum_str.replace(' ', '').split('->')
  letters = inputs.split(',')[0].replace('...', '')
  lead = x_ndim - len(letters)
  return tuple(lead + i for i, c in enumerate(letters) if c not in output)


def output_axes(module: nn.Module, kernel_ndim: int) -> tuple[int, ...]:
  """The kernel axes that index output features."""
  if isinstance(module, nn.Einsum):
    return einsum_output_axes(module.einsum_str)
  if isinstance(module, nn.DenseGeneral):
    features = module.features if isinstance(module.features, Sequence) else (module.features,)
    return tuple(range(kernel_ndim - len(features), kernel_ndim))
  return (kernel_ndim - 1,)


def granular_shapes(kernel_shape, out_axes, granularity: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(stored shape of a layer's scales, the shape they broadcast with against the kernel): () and () per tensor;
  (out,) and 1s except on the output axes per channel."""
  if granularity == 'tensor':
    return (), ()
  broadcast = tuple(d if i in out_axes else 1 for i, d in enumerate(kernel_shape))
  return (int(np.prod([kernel_shape[i] for i in out_axes])),), broadcast


def scale_shapes(module: nn.Module, kernel_shape, rule: QuantConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(stored shape of the layer's scales, the shape they broadcast with against the kernel)."""
  return granular_shapes(kernel_shape, output_axes(module, len(kernel_shape)), rule.scale_granularity)


def ternary_kernel(kernel: jax.Array, scales, rule: QuantConfig, scale_shape=()) -> jax.Array:
  """The kernel a selected layer computes with: its method's forward kernel (`METHODS[rule.method].kernel`,
  with the method's gradient rule) on the float32 latent kernel, as `TernaryWeights` decides its codes.
  `scales`: {name: value in `scale_shape`} of the method's trained scales."""
  return rule.spec.kernel(kernel.astype(jnp.float32), scales, rule, scale_shape).astype(kernel.dtype)


def input_axes(module: nn.Module, x_ndim: int) -> tuple[int, ...]:
  """The axes of a layer's input that its kernel contracts: the feature axis of Dense, `axis` of
  DenseGeneral, the input letters the output lacks of Einsum, the channel axis (last, per pixel) of Conv and
  ConvTranspose."""
  if isinstance(module, nn.Einsum):
    return einsum_input_axes(module.einsum_str, x_ndim)
  if isinstance(module, nn.DenseGeneral):
    axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
    return tuple(sorted(a % x_ndim for a in axis))
  return (x_ndim - 1,)


# --------------------------------------------------------------------------- the interceptor

_ACTIVE = contextvars.ContextVar('ttq_quantize_active', default=None)


class _Session:
  """The rules of one call of a quantized model and the layers they selected in it."""

  def __init__(self, rules: Sequence[Rule]):
    self.rules, self.selected, self.broadcast, self.layers = tuple(rules), {}, {}, set()

  def intercept(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or module.scope is None:
      return next_fun(*args, **kwargs)
    path = '/'.join(module.scope.path)
    if isinstance(module, nnx.bridge.ToLinen) and any(r.quantized for r in self.rules):
      raise ValueError(f'quantize: the layers of {path or "the model"!r} are an NNX module inside Linen '
                       f'(nnx.bridge.ToLinen({module.nnx_class.__name__})), which the rules cannot see (it would '
                       'train in full precision): quantize the NNX module itself (quant.quantize accepts it)')
    if isinstance(module, (nn.Embed,) + KERNEL_LAYERS):
      self.layers.add(path)
    rule = first_rule(self.rules, path)
    if rule is None or not isinstance(module, (nn.Embed,) + KERNEL_LAYERS):
      return next_fun(*args, **kwargs)  # not selected, or a container: its layers are looked at one by one
    if isinstance(module, nn.Embed) and (rule.quantized or rule.activations != 'float'):  # an 'fp' rule asks for nothing
      raise ValueError(f'Rule(module_path={rule.module_path!r}, method={rule.method!r}) selects the nn.Embed at '
                       f'{path!r}: embedding tables cannot be ternary; layers with a kernel can: '
                       f'{", ".join(c.__name__ for c in KERNEL_LAYERS)} (an \'fp\' rule may select it)')
    self.selected[path] = rule
    quantize_input = ACTIVATIONS[rule.activations]  # (an Embed got here only with 'float')
    if quantize_input is not None:  # the layer's input: its first argument, or `inputs=` (every KERNEL_LAYERS name)
      if args:
        args = (quantize_input(args[0], input_axes(module, jnp.ndim(args[0]))),) + tuple(args[1:])
      else:
        kwargs = dict(kwargs, inputs=quantize_input(kwargs['inputs'], input_axes(module, jnp.ndim(kwargs['inputs']))))
    if not rule.quantized:
      return next_fun(*args, **kwargs)
    real_param = module.param

    def param(name, init_fn, *init_args, **init_kwargs):
      value = real_param(name, init_fn, *init_args, **init_kwargs)
      if name != 'kernel':
        return value
      stored, broadcast = scale_shapes(module, value.shape, rule)
      self.broadcast[path] = broadcast
      scales = {}
      for scale in rule.spec.scale_names:  # initialised by the method (its own scale init) from the kernel
        init = lambda rng, shape, dtype, scale=scale: jnp.reshape(
            rule.spec.initial_scales(value.astype(jnp.float32), rule, broadcast)[scale], shape).astype(dtype)
        scales[scale] = real_param(scale, init, stored, jnp.float32).reshape(broadcast)
      return ternary_kernel(value, scales, rule, broadcast)

    object.__setattr__(module, 'param', param)  # this instance only, for this call
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__delattr__(module, 'param')


def _quantized_call(self, *args, **kwargs):
  if _ACTIVE.get() is not None:  # nested in another quantized model's call: its rules already apply
    return super(type(self), self).__call__(*args, **kwargs)
  session = _Session(type(self).ttq_rules)
  token = _ACTIVE.set(session)
  try:
    with nn.intercept_methods(session.intercept):
      out = super(type(self), self).__call__(*args, **kwargs)
  finally:
    _ACTIVE.reset(token)
  if self.is_initializing():
    unused = [r.module_path for r in session.rules if r not in session.selected.values()]
    if unused:
      warnings.warn(f'quantize: rules that selected no layer: {", ".join(repr(u) for u in unused)} (the model\'s '
                    f'layer paths: {", ".join(sorted(session.layers)) or "none"})', stacklevel=2)
  return out


def quantize(model: nn.Module, rules: Sequence[Rule]) -> nn.Module:
  """A Flax module that computes what `model` computes, with the kernels of the layers that `rules`
  select ternarized by their rules' methods (TTQ by default: per-layer `w_p` / `w_n`, trained). See the module doc."""
  rules = tuple(rules)
  for r in rules:
    if not isinstance(r, Rule):
      raise TypeError(f'quantize: rules must be ttq_jax.quant.Rule, got {type(r).__name__}')
  base = type(model)
  cls = type(f'Quantized{base.__name__}', (base,), {'__call__': _quantized_call, 'ttq_rules': rules,
                                                     '__module__': base.__module__})
  return cls(**_settings(model))


def _settings(model: nn.Module) -> dict[str, Any]:
  """The model's own dataclass fields (not its place in a module tree)."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init and f.name not in ('parent', 'name')}


class TernaryLayer(NamedTuple):
  """A layer whose kernel is ternary: its module `path` (the kernel is `path + '/kernel'`), its settings
  (`quant`: a quantizing method of `METHODS`, threshold, ...) and the shape its method's scales take against the
  kernel (`scale_shape`: () per tensor; 1s except on the output axes per channel)."""
  path: str
  quant: QuantConfig
  scale_shape: tuple[int, ...] = ()

  @property
  def kernel_path(self) -> str:
    return f'{self.path}/kernel' if self.path else 'kernel'

  @property
  def scale_paths(self) -> tuple[str, ...]:
    """Paths of the layer's trained scale parameters (`METHODS[method].scale_names`, beside the kernel)."""
    return tuple(f'{self.path}/{n}' if self.path else n for n in self.quant.spec.scale_names)


def _trace(model: nn.Module, example_args, example_kwargs) -> _Session:
  """Traces `model.init` (jax.eval_shape: nothing is computed) recording the layers that rules select."""
  session = _Session(getattr(type(model), 'ttq_rules', ()))

  def init():
    token = _ACTIVE.set(session)  # a quantize()d model's own call then runs inside this session
    try:
      with nn.intercept_methods(session.intercept):
        return model.init(jax.random.PRNGKey(0), *example_args, **example_kwargs)
    finally:
      _ACTIVE.reset(token)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    jax.eval_shape(init)
  return session


def unquantized(model: nn.Module) -> nn.Module:
  """The plain model a quantize()d model was made from (the model itself if it was not)."""
  if getattr(type(model), 'ttq_rules', None) is None:
    return model
  return type(model).__mro__[1](**_settings(model))


def selected_layers(model: nn.Module, *example_args, **example_kwargs) -> dict[str, Rule]:
  """{module path: rule} of the layers a quantize()d model's rules select (rule method 'fp' included)."""
  if getattr(type(model), 'ttq_rules', None) is None:
    raise TypeError(f'selected_layers: {type(model).__name__} is not a quantize()d model')
  return dict(_trace(model, example_args, example_kwargs).selected)


def activation_modes(model: nn.Module, *example_args, **example_kwargs) -> dict[str, str]:
  """{module path: `activations`} of the layers whose input is quantized ('int8'), whatever their method
  (an 'fp' rule may quantize activations too); empty for a model without such rules."""
  if getattr(type(model), 'ttq_rules', None) is None:
    return {}
  selected = _trace(model, example_args, example_kwargs).selected
  return {path: rule.activations for path, rule in sorted(selected.items()) if rule.activations != 'float'}


def with_activation_modes(model: nn.Module, modes: dict[str, str]) -> nn.Module:
  """The plain `model` with the input of each layer of `modes` ({module path: activations}) quantized and its
  kernel left as it is: an exported model (dense ternary kernels) computes as the trained one."""
  model = unquantized(model)
  if not modes:
    return model
  return quantize(model, [Rule(module_path=re.escape(path), method='fp', activations=mode) for path, mode in modes.items()])


def ternary_layers(model: nn.Module, *example_args, **example_kwargs) -> tuple[TernaryLayer, ...]:
  """Every layer of `model` whose kernel is ternary, decided once from the module tree (the rules of a
  quantize()d model), never from names. Sorted by path.

  Every consumer (optimizer masks, the scale init at the switch to ternary, reports, parameter counts,
  export) takes this answer.
  """
  session = _trace(model, example_args, example_kwargs)
  return tuple(sorted(TernaryLayer(path, rule, session.broadcast.get(path, ()))
                      for path, rule in session.selected.items() if rule.quantized))
