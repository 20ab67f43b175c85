"""Any Flax model as the functional pair the steps call, `init(rng, x, train=...) -> variables` and
`apply(variables, x, train=..., mutable=..., rngs=...)`: a Linen module is that already; an NNX module is
seen through `NNXModel`, so training, checkpoints, sharding, evaluation and export have one code path.

    model = as_functional(quant.quantize(Net(nnx.Rngs(0)), rules))   # NNXModel; a Linen module passes through

`NNXModel` splits the module once (`nnx.split`: graph definition + state). Its variables are the state as
plain nested dicts with string keys (list indices '0', '1', ...): `params` every `nnx.Param` (the kernels,
biases and each ternary layer's trained scales beside its kernel), `batch_stats` every `nnx.BatchStat` (what
`nnx.BatchNorm` updates in training). `apply` merges graph and variables into a fresh module, switches it with
NNX's own `model.train()` / `model.eval()`, calls it and returns the updated batch statistics when asked
(`mutable`). Random streams (`nnx.RngState`, e.g. `nnx.Dropout`'s) are reseeded on each training call from
`rngs['dropout']`, which the train step derives from the seed and the step number, so a resumed run draws the
same dropout masks (the step is in the checkpoint); other non-parameter state is the module's own, constant.
"""

from __future__ import annotations

import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from ttq_jax import quant as quant_lib
from ttq_jax.errors import ConfigError
from ttq_jax.quant import nnx_rules


def _fill(template, pure: dict):
  """`template` (an NNX state) with the values of `pure` (as `nnx_rules.pure` writes it)."""
  values = traverse_util.flatten_dict(pure)
  flat = []
  for path, variable in nnx.to_flat_state(template):
    key = tuple(str(p) for p in path)
    flat.append((path, variable.replace(values[key]) if key in values else variable))
  return nnx.from_flat_state(flat)


class NNXModel:
  """An NNX module as `init` / `apply` (see the module doc). `full_precision=True`: its full-precision twin
  (the same variables; every selected layer computes with its latent kernel, the FP warm-up)."""

  def __init__(self, module: nnx.Module, full_precision: bool = False):
    self.module = module
    self.full_precision = full_precision
    self.graphdef, self._params, self._batch_stats, self._rest = nnx.split(module, nnx.Param, nnx.BatchStat, ...)

  @property
  def name(self) -> str:
    """The plain model's class name (a selected layer's class is a subclass of its own: `nnx_rules`)."""
    cls = type(self.module)
    return (cls.__mro__[1] if getattr(self.module, 'ttq_rule', None) is not None else cls).__name__

  def init(self, rng=None, *args, train: bool = False, **kwargs) -> dict:
    """The module's own values (it was initialised when it was constructed: `rng` is not used); with example
    inputs, first checks that the loop can call it as `model(inputs)` (one line if not)."""
    del rng, train
    variables = {'params': nnx_rules.pure(self._params), 'batch_stats': nnx_rules.pure(self._batch_stats)}
    if args:
      try:
        jax.eval_shape(lambda: self.apply(variables, *args, **kwargs))
      except TypeError as e:
        shapes = ', '.join(f'{getattr(a, "dtype", "")}{list(getattr(a, "shape", ()))}' for a in args)
        raise ConfigError(f'model={self.name}: the training loop calls model(inputs) with inputs {shapes}, which '
                          f'its __call__ does not take ({str(e).splitlines()[0][:200]})') from None
    return variables

  def bind(self, variables: dict, dropout_key=None) -> nnx.Module:
    """A new module holding `variables` (the one given to the constructor is not changed); with `dropout_key`,
    its random streams start from that key."""
    rest = []
    for path, variable in nnx.to_flat_state(self._rest):  # fresh variables in the caller's trace
      value = variable.get_value()
      if dropout_key is not None and isinstance(variable, nnx.RngKey):
        value = jax.random.wrap_key_data(dropout_key) if dropout_key.dtype == jnp.uint32 else dropout_key
      elif dropout_key is not None and isinstance(variable, nnx.RngCount):
        value = jnp.zeros_like(value)
      rest.append((path, variable.replace(value)))
    return nnx.merge(self.graphdef, _fill(self._params, variables['params']),
                     _fill(self._batch_stats, variables.get('batch_stats', {})), nnx.from_flat_state(rest))

  def apply(self, variables: dict, *args, train: bool = False, mutable=False, rngs: dict | None = None, **kwargs):
    module = self.bind(variables, rngs['dropout'] if train and rngs else None)
    module.train() if train else module.eval()
    with nnx_rules.full_precision() if self.full_precision else contextlib.nullcontext():
      out = module(*args, **kwargs)
    if mutable:
      return out, {'batch_stats': nnx_rules.pure(nnx.state(module, nnx.BatchStat))}
    return out

  def unquantized(self) -> 'NNXModel':
    """The full-precision twin: same variables (scales included, unused), latent kernels."""
    return NNXModel(self.module, full_precision=True)

  def plain(self, modes: dict[str, str] | None = None) -> 'NNXModel':
    """The plain model (its layers as they were before `quant.quantize`, no scales), with the input of each
    layer of `modes` ({path: activations}) quantized as in training: what an export's dense kernels run in."""
    plain = nnx_rules.unquantize(self.module)
    if modes:
      plain = nnx_rules.quantize(plain, [quant_lib.Rule(module_path=re.escape(p), method='fp', activations=m)
                                         for p, m in modes.items()])
    return NNXModel(plain)

  def ternary_layers(self) -> tuple[quant_lib.TernaryLayer, ...]:
    return nnx_rules.ternary_layers(self.module)

  def activation_modes(self) -> dict[str, str]:
    return nnx_rules.activation_modes(self.module)


def as_functional(model):
  """`model` as the steps call it: None (the config's model) and Linen modules as they are, an NNX module as
  `NNXModel`; anything else, and a Linen model that is an `nnx.bridge.ToLinen` wrapper (its NNX layers are hidden
  from the rules: it would train in full precision), is refused in one line."""
  if model is None or isinstance(model, NNXModel):
    return model
  if nnx_rules.is_nnx(model):
    if not callable(getattr(model, '__call__', None)) or type(model).__call__ is nnx.Module.__call__:
      raise ConfigError(f'model={type(model).__name__} is an NNX module without a __call__: the training loop '
                        'calls model(inputs)')
    return NNXModel(model)
  if isinstance(model, nnx.bridge.ToLinen):
    raise ConfigError(f'model=nnx.bridge.ToLinen({model.nnx_class.__name__}) hides its NNX layers from the '
                      'quantization rules (it would train in full precision): pass the NNX module itself')
  if isinstance(model, nn.Module):
    return model
  raise ConfigError(f'model={type(model).__name__} is neither a Flax Linen module nor a Flax NNX module')


def unquantized(model):
  """The full-precision twin of a functional model (Linen: the plain module; NNX: `NNXModel.unquantized`)."""
  return model.unquantized() if isinstance(model, NNXModel) else quant_lib.unquantized(model)


def plain(model, modes: dict[str, str] | None = None):
  """The plain model of a functional model (the layers before `quant.quantize`, no scales), with the input of
  each layer of `modes` ({path: activations}) quantized: what an export's dense ternary kernels run in."""
  if isinstance(model, NNXModel):
    return model.plain(modes)
  return quant_lib.with_activation_modes(model, modes or {})


def model_name(model) -> str | None:
  """The class name of the plain model (None for the config's own)."""
  if model is None:
    return None
  return model.name if isinstance(model, NNXModel) else type(quant_lib.unquantized(model)).__name__
