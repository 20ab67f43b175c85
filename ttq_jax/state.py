"""The train state: model construction, sharded initialisation, the switch to ternary, and restoring
a workdir's state (mesh + state + checkpoint in one call for eval, export, notebooks and tests)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.training import train_state

from ttq_jax import checkpoint as ckpt
from ttq_jax import input_pipeline
from ttq_jax import models
from ttq_jax import optim
from ttq_jax import quant as quant_lib
from ttq_jax import sharding as sharding_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class TrainState(train_state.TrainState):
  batch_stats: Any


def quant_config(config) -> quant_lib.QuantConfig:
  return quant_lib.QuantConfig.from_mapping(config.quant)


def compute_dtype(config):
  return DTYPES[config.dtype]


def create_model(config, *, quantized: bool = True) -> nn.Module:
  """The configured model; `quantized=False` gives its full-precision twin (same param paths)."""
  info = input_pipeline.dataset_info(config.data.name)
  q = quant_config(config) if quantized else quant_lib.QuantConfig(method='fp')
  return models.create_model(config.model.name, num_classes=info.num_classes, quant=q,
                             quantize_first_last=config.model.quantize_first_last, dtype=compute_dtype(config))


def init_variables(model: nn.Module, rng: jax.Array, image_shape) -> dict:
  return model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)


def create_train_state(config, model: nn.Module, mesh, rng: jax.Array | None = None) -> TrainState:
  """A fresh train state created directly with its shardings (no host copy of the parameters)."""
  info = input_pipeline.dataset_info(config.data.name)
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  init_rng, _ = jax.random.split(rng)  # (the second key seeded a state rng nothing used; kept for equal inits)

  def make():
    variables = init_variables(model, init_rng, info.image_shape)
    params = variables['params']
    return TrainState.create(apply_fn=model.apply, params=params, tx=optim.create_optimizer(config, params),
                             batch_stats=variables.get('batch_stats', {}))

  abstract = jax.eval_shape(make)
  shardings = sharding_lib.state_shardings(abstract, mesh)
  return jax.jit(make, out_shardings=shardings)()


def state_shardings(state) -> Any:
  return jax.tree.map(lambda x: x.sharding, state)


# --------------------------------------------------------------------------- the switch to ternary


def _constant_scales(kernel, value, q):
  del kernel
  return jnp.full_like(value['w_p'], q.w_p_init), jnp.full_like(value['w_n'], q.w_n_init)


def _mean_abs_scales(kernel, value, q):
  delta = quant_lib.threshold(kernel, q)
  pos, neg = kernel > delta, kernel < -delta
  w_p = jnp.sum(jnp.where(pos, kernel, 0)) / jnp.maximum(jnp.sum(pos), 1)
  w_n = jnp.sum(jnp.where(neg, -kernel, 0)) / jnp.maximum(jnp.sum(neg), 1)
  return w_p.astype(value['w_p'].dtype), w_n.astype(value['w_n'].dtype)


# quant.scale_init -> (kernel, layer params, QuantConfig) -> (w_p, w_n) at the switch to ternary
SCALE_INITS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    'constant': _constant_scales,   # w_p_init / w_n_init (official code: 1.0)
    'mean_abs': _mean_abs_scales,   # mean |w| of each sign above the threshold
}


def start_ternary(params, config) -> dict:
  """At the switch to ternary (end of the FP warm-up, or after `init_from`): optionally scale each
  ternary kernel to [-1, 1] (`normalize_init`, the paper's text) and set w_p / w_n by
  `SCALE_INITS[config.quant.scale_init]`. Returns a new params dict."""
  q = quant_config(config)
  params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else jax.tree.map(lambda x: x, params)
  init_scales = SCALE_INITS[config.quant.scale_init]

  def visit(tree):
    for name, value in tree.items():
      if not isinstance(value, dict):
        continue
      if quant_lib.is_ternary_layer(name) and 'w_p' in value:
        if config.normalize_init:
          value['kernel'] = value['kernel'] / jnp.max(jnp.abs(value['kernel']))
        value['w_p'], value['w_n'] = init_scales(value['kernel'], value, q)
      else:
        visit(value)
  visit(params)
  return params


# --------------------------------------------------------------------------- a workdir's state


class _StateWithRng(TrainState):
  """The train state as saved before 0.2: it also held an rng key that nothing read."""
  rng: Any


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
  return mesh, create_train_state(config, model or create_model(config), mesh)


def restore(config, workdir: str, *, step: int | None = None, model: nn.Module | None = None,
            mesh_shape=None) -> Restored:
  """The newest readable checkpoint of `workdir` (or exactly `step`) restored into a fresh state of
  `config` (read only: nothing in the workdir changes). Raises CheckpointError when there is none."""
  mesh, state = create_mesh_and_state(config, model, mesh_shape)
  manager = ckpt.create_manager(workdir, read_only=True)
  restored = restore_latest(manager, state, step)
  if restored is None:
    raise ckpt.CheckpointError(f'workdir {workdir} has no checkpoints (looked in {ckpt.checkpoint_dir(workdir)})')
  return Restored(mesh, *restored)
