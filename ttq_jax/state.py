"""The train state: model construction, sharded initialisation, the switch to ternary, and restoring
a workdir's state (mesh + state + checkpoint in one call for eval, export, notebooks and tests)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax.training import train_state

from ttq_jax import checkpoint as ckpt
from ttq_jax import datasets
from ttq_jax import functional
from ttq_jax import models
from ttq_jax import optim
from ttq_jax import paths
from ttq_jax import quant as quant_lib
from ttq_jax import sharding as sharding_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class TrainState(train_state.TrainState):
  """Params, optimizer state and BN statistics; `ternary` (static, not checkpointed) lists the model's
  ternary layers (`quant.ternary_layers`), the one answer every consumer uses."""
  batch_stats: Any
  ternary: tuple[quant_lib.TernaryLayer, ...] = flax.struct.field(pytree_node=False, default=())


def quant_config(config) -> quant_lib.QuantConfig:
  return quant_lib.QuantConfig.from_mapping(config.quant)


def compute_dtype(config):
  return DTYPES[config.dtype]


def create_model(config, *, quantized: bool = True):
  """The configured model (a Linen module, or an NNX one as `functional.NNXModel`); `quantized=False` gives its
  full-precision twin (same param paths)."""
  info = datasets.dataset_info(config.data)
  q = quant_config(config) if quantized else quant_lib.QuantConfig(method='fp')
  return functional.as_functional(models.create_model(config.model.name, num_classes=info.num_classes, quant=q,
                             full_precision=config.quant.full_precision_layers,
                             ghost_batch_size=config.model.bn_ghost_batch_size,
                             bn_unbiased_variance=config.model.bn_unbiased_variance,
                             bn_bias_init=config.model.bn_bias_init, dtype=compute_dtype(config),
                             sizes={k: config.model[k] for k in models.SIZE_KEYS}, seed=config.seed))


def accepts_train(model: nn.Module) -> bool:
  """Whether the model's `__call__` takes `train=` (the plain model's, for a quantize()d one; an NNX model's
  apply always does: it switches the module with `train()` / `eval()`)."""
  if isinstance(model, functional.NNXModel):
    return True
  params = inspect.signature(type(quant_lib.unquantized(model)).__call__).parameters
  return 'train' in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _train_kwargs(model: nn.Module, train: bool) -> dict:
  return {'train': train} if accepts_train(model) else {}


def apply_fn(model: nn.Module, seed: int = 0) -> Callable:
  """`model.apply`, called by the steps as `apply(variables, images, train=..., step=..., **kw)`: with `step`
  (the train step passes its state's), the model's dropout draws from `fold_in(PRNGKey(seed), step)`, so a
  resumed run draws what an uninterrupted one does; for a model whose `__call__` has no `train` argument (no
  batch norm or dropout to switch), `train` is not passed."""
  train_arg = accepts_train(model)

  def apply(variables, *args, train=None, step=None, **kwargs):
    if step is not None:
      kwargs['rngs'] = {'dropout': jax.random.fold_in(jax.random.PRNGKey(seed), step)}
    if train_arg and train is not None:
      kwargs['train'] = train
    return model.apply(variables, *args, **kwargs)
  return apply


def example_input(info) -> jax.Array:
  """One example of what the model takes (zeros): `info` a `datasets.DatasetInfo`, or an image shape."""
  if isinstance(info, datasets.DatasetInfo):
    return jnp.zeros((1, *info.input_shape), info.input_dtype)
  return jnp.zeros((1, *info), jnp.float32)


def init_variables(model: nn.Module, rng: jax.Array, info) -> dict:
  """The model's variables (`info`: a DatasetInfo or an image shape)."""
  return model.init(rng, example_input(info), **_train_kwargs(model, False))


def activation_modes(model: nn.Module, info) -> dict[str, str]:
  """{module path: activations} of the model's layers with quantized inputs (`quant.activation_modes`)."""
  if isinstance(model, functional.NNXModel):
    return model.activation_modes()
  return quant_lib.activation_modes(model, example_input(info), **_train_kwargs(model, False))


def ternary_layers(model: nn.Module, info) -> tuple[quant_lib.TernaryLayer, ...]:
  """The model's ternary layers, from its module tree (`quant.ternary_layers`; `info` as `init_variables`)."""
  if isinstance(model, functional.NNXModel):
    return model.ternary_layers()
  return quant_lib.ternary_layers(model, example_input(info), **_train_kwargs(model, False))


def create_train_state(config, model: nn.Module, mesh, rng: jax.Array | None = None) -> TrainState:
  """A fresh train state created directly with its shardings (no host copy of the parameters)."""
  info = datasets.dataset_info(config.data)
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  init_rng, _ = jax.random.split(rng)  # (the second key seeded a state rng nothing used; kept for equal inits)

  layers = ternary_layers(model, info)

  def make():
    variables = init_variables(model, init_rng, info)
    params = variables['params']
    return TrainState.create(apply_fn=apply_fn(model), params=params, tx=optim.create_optimizer(config, params, layers),
                             batch_stats=variables.get('batch_stats', {}), ternary=layers)

  abstract = jax.eval_shape(make)
  shardings = sharding_lib.state_shardings(abstract, mesh)
  return jax.jit(make, out_shardings=shardings)()


def shardings_of(state) -> Any:
  """The shardings an existing state (or any tree of arrays) has (`sharding.state_shardings` computes the
  ones a state should get on a mesh)."""
  return jax.tree.map(lambda x: x.sharding, state)


# --------------------------------------------------------------------------- the switch to ternary


def start_ternary(params, config, layers) -> dict:
  """At the switch to ternary (end of the FP warm-up, or after `init_from`): for each layer of `layers`
  (`TrainState.ternary`) whose method trains scales (`quant.METHODS[...].scale_names`), optionally scale the
  kernel to [-1, 1] (`normalize_init`, the paper's text) and set its scales by the method's
  `initial_scales` with `config.quant.scale_init` (None: the method's own; ttq: 'constant' w_p_init / w_n_init
  or 'mean_abs'; paretoq: 'max_abs', max|w| per channel or tensor). Returns a new params dict."""
  params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else jax.tree.map(lambda x: x, params)
  for layer in layers:
    spec = layer.quant.spec
    if not spec.trained_scales:  # TWN, BitNet: no scale to set
      continue
    value = paths.at(params, layer.path)
    if config.normalize_init:
      value['kernel'] = value['kernel'] / jnp.max(jnp.abs(value['kernel']))
    scales = spec.initial_scales(jnp.asarray(value['kernel'], jnp.float32), layer.quant, layer.scale_shape,
                                 config.quant.scale_init)
    for name, scale in scales.items():
      value[name] = jnp.reshape(scale, value[name].shape).astype(value[name].dtype)
  return params


# --------------------------------------------------------------------------- a workdir's state


class _StateWithRng(TrainState):
  """The train state as saved before 0.2: it also held an rng key that nothing read."""
  rng: Any = None


def _with_unused_rng(abstract: TrainState):
  """Checkpoints written before `TrainState.rng` was dropped: restore with the key, then drop it."""
  any_leaf = jax.tree.leaves(abstract.params)[0]
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding_lib.replicated(any_leaf.sharding.mesh))
  older = _StateWithRng(**{f: getattr(abstract, f) for f in TrainState.__dataclass_fields__}, rng=rng)
  return older, lambda restored: TrainState(**{f: getattr(restored, f) for f in TrainState.__dataclass_fields__})


LEGACY_FORMATS = (_with_unused_rng,)


def restore_latest(manager, state: TrainState, step: int | None = None):
  """`checkpoint.restore_latest` into `state`'s structure, also reading the earlier state formats."""
  return ckpt.restore_latest(manager, state, step, legacy=LEGACY_FORMATS)


class Restored(NamedTuple):
  mesh: jax.sharding.Mesh
  step: int
  state: TrainState
  data_state: dict


def create_mesh_and_state(config, model: nn.Module | None = None, mesh_shape=None):
  """(mesh, fresh sharded state) for `config` (`mesh_shape` overrides `config.mesh_shape`)."""
  mesh = sharding_lib.create_mesh(config.mesh_shape if mesh_shape is None else mesh_shape, config.mesh_axes)
  return mesh, create_train_state(config, functional.as_functional(model) or create_model(config), mesh)
