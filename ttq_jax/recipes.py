"""The effective recipe of a config, computed from it as the code will run it, next to the official one.

`describe(config)` answers "what will this config do": batch, steps, the learning-rate steps (read off
the schedule function itself), the optimizers of weights and scales, which parameters decay, which
kernels are ternary (from the model's module tree), the warm start, the threshold and the dtype.
The paper's table rows with the official value of each field and the file it comes from (research data,
next to the configs: `configs/paper_rows.py`) are compared with it by `markdown(described, rows)`;
`experiments/reproduce.py --describe` prints both and `docs/recipes.md` is that markdown.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ttq_jax import config_check
from ttq_jax import datasets
from ttq_jax import optim
from ttq_jax import paths
from ttq_jax import state as state_lib
from ttq_jax import steps as steps_lib

FIELDS = ('global_batch_size', 'total_steps', 'lr_boundaries_steps', 'lr_values', 'base_learning_rate',
          'weight_optimizer', 'scale_optimizer', 'weight_decay', 'weight_decay_params', 'ternary_layers',
          'full_precision_layers', 'warm_start', 'normalize_init', 'threshold', 'threshold_t', 'threshold_k',
          'activations', 'dtype', 'bn_unbiased_variance', 'bn_bias_init')


def _optimizer(config, name: str, learning_rate: float) -> dict:
  sgd = name == 'sgd'
  return {'name': name, 'learning_rate': float(learning_rate), 'momentum': float(config.momentum) if sgd else None,
          'nesterov': bool(config.nesterov) if sgd else False}


def _lr_steps(config) -> tuple[list[int], list[float]]:
  """Every step at which the rate changes and the rate from there (piecewise / constant schedules; a
  cosine changes every step and is summarised as no boundaries)."""
  if config.lr_schedule == 'cosine' or steps_lib.warmup_steps(config) > 0:
    return [], []
  total = steps_lib.total_steps(config)
  rates = np.asarray(jax.jit(jax.vmap(optim.create_learning_rate_fn(config)))(jnp.arange(total)))
  changes = np.nonzero(rates[1:] != rates[:-1])[0] + 1
  return [int(s) for s in changes], [float(f"{rates[s]:.7g}") for s in changes]  # float32 -> its decimal


def describe(config) -> dict[str, Any]:
  """The recipe `config` runs (see module docstring); param paths are slash-joined Flax paths."""
  model = state_lib.create_model(config)
  info = datasets.dataset_info(config.data)
  params = jax.eval_shape(lambda: state_lib.init_variables(model, jax.random.PRNGKey(0), info))['params']
  ternary = [layer.kernel_path for layer in state_lib.ternary_layers(model, info)]
  all_paths = list(paths.flat(params))
  decay = paths.flat(optim.weight_decay_mask(params, config.weight_decay_regex))
  boundaries, values = _lr_steps(config)
  quantized = steps_lib.is_quantized(config)
  rule = state_lib.quant_config(config).threshold_rule  # the threshold rule in force (None: full precision)
  scale_opt = None
  if quantized and state_lib.quant_config(config).spec.trained_scales:
    scale_opt = (_optimizer(config, config.optimizer, config.learning_rate) if config.scale_optimizer == 'same'
                 else _optimizer(config, 'adam', config.scale_learning_rate))
  return {
      'method': config.quant.method,
      'global_batch_size': int(config.batch_size),
      'total_steps': steps_lib.total_steps(config),
      'steps_per_epoch': steps_lib.steps_per_epoch(config),
      'lr_boundaries_steps': boundaries,
      'lr_values': values,
      'base_learning_rate': float(config.learning_rate),
      'weight_optimizer': _optimizer(config, config.optimizer, config.learning_rate),
      'scale_optimizer': scale_opt,
      'weight_decay': float(config.weight_decay),
      'weight_decay_params': [p for p, on in decay.items() if on] if config.weight_decay else [],
      'ternary_layers': sorted(ternary),
      'full_precision_layers': sorted(p for p in all_paths if p.endswith('/kernel') and p not in ternary),
      'warm_start': config_check.warm_start(config),
      'normalize_init': bool(config.normalize_init) and quantized,
      'threshold': rule,
      'threshold_t': float(config.quant.t) if rule == 'max' else None,
      'threshold_k': float(config.quant.k) if rule == 'mean' else None,
      'activations': config.quant.activations if quantized else None,
      'dtype': config.dtype,
      'bn_ghost_batch_size': int(config.model.bn_ghost_batch_size),
      'bn_unbiased_variance': bool(config.model.bn_unbiased_variance),
      'bn_bias_init': config.model.bn_bias_init,
      'eval_every_steps': int(config.eval_every_steps),
  }


def _fmt(value) -> str:
  if isinstance(value, list) and len(value) > 6 and all(isinstance(v, str) for v in value):
    return f'{len(value)} paths: `{value[0]}` ... `{value[-1]}`'
  if isinstance(value, dict):
    return ', '.join(f'{k}={v}' for k, v in value.items())
  return f'`{value}`' if isinstance(value, str) else str(value)


def markdown(described: list[dict], rows) -> str:
  """docs/recipes.md: per row (`configs.paper_rows.PaperRow`: name, paper_error, official), each field as
  ttq_jax runs it next to the official value and its source."""
  by_name = {r.name: r for r in rows}
  out = ['# Recipes: what each paper-row config runs, next to the official code', '',
         'Generated by `python experiments/reproduce.py --table paper --describe --markdown docs/recipes.md`',
         '(`tests/test_recipes.py` checks that this file is what the configs describe today). "ttq_jax" is',
         'computed from the config as the code will run it; "official" is the authors\' value and where it',
         'comes from. Param paths are Flax paths; the official TF names map as `res1.0/conv1/W` ->',
         '`res1_0/conv1/kernel`, `Wp` / `Wn` -> `w_p` / `w_n`. Steps count optimizer updates.', '']
  for d in described:
    row = by_name[d['name']]
    out += [f'## {d["name"]} (`{d["config"]}`), paper error {row.paper_error}%', '',
            '| field | ttq_jax | official | source |', '|---|---|---|---|']
    for field in FIELDS:
      if field in row.official:
        value, source = row.official[field]
        same = '' if value == d[field] else ' **(differs)**'
        out.append(f'| {field} | {_fmt(d[field])}{same} | {_fmt(value)} | {source} |')
      else:
        out.append(f'| {field} | {_fmt(d[field])} | - | {"ours: no official recipe" if row.official or "ResNet-18" in row.name else "-"} |')
    out.append('')
  return '\n'.join(out)
