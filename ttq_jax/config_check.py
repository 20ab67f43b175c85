"""Config validation and the workdir guard: every bad value is a one-line ValueError."""

from __future__ import annotations

import json
import os
import tempfile

from ttq_jax import input_pipeline
from ttq_jax import models
from ttq_jax.quant import QuantConfig

CHOICES = {
    'quant.scale_init': ('constant', 'mean_abs'),
    'dtype': ('float32', 'bfloat16'),
    'optimizer': ('sgd', 'adam'),
    'lr_schedule': ('cosine', 'piecewise', 'constant'),
    'scale_optimizer': ('adam', 'same'),
    'export.packing': ('2bit', 'base3'),
    'xla_cpu_ynn_fusion': ('auto', 'on', 'off'),
}
POSITIVE_INTS = ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps')
# Fields that change what the model or data are: a workdir trained with other values is refused.
GUARDED_PREFIXES = ('model.', 'quant.', 'data.name', 'data.limit_examples', 'dtype', 'seed', 'fp_warmup_epochs',
                    'init_from', 'ternary_kernel_lr_multiplier')


def _get(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def validate(config) -> None:
  """Raises ValueError naming the first bad value and what is allowed."""
  if config.model.name not in models.MODELS:
    raise ValueError(f'model.name={config.model.name!r} is unknown: allowed are {", ".join(sorted(models.MODELS))}')
  info = input_pipeline.dataset_info(config.data.name)
  min_size = models.MIN_IMAGE_SIZE.get(config.model.name, 0)
  if min(info.image_shape[:2]) < min_size:
    fits = [n for n in ('fashion_mnist', 'cifar10', 'imagenet2012')
            if min(input_pipeline.dataset_info(n).image_shape[:2]) >= min_size]
    raise ValueError(f'model.name={config.model.name!r} needs images of at least {min_size}x{min_size}, but '
                     f'data.name={config.data.name!r} has {info.image_shape[0]}x{info.image_shape[1]}: '
                     f'allowed datasets for it are {", ".join(fits)}')
  QuantConfig.from_mapping(config.quant)
  for key, allowed in CHOICES.items():
    value = _get(config, key)
    if value not in allowed:
      raise ValueError(f'{key}={value!r} is unknown: allowed are {", ".join(allowed)}')
  for key in POSITIVE_INTS:
    if int(_get(config, key)) <= 0:
      raise ValueError(f'{key}={_get(config, key)!r} must be a positive integer')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError(f'num_epochs={config.num_epochs!r} must be > 0 (or set num_train_steps > 0)')
  if config.learning_rate < 0 or config.scale_learning_rate < 0:
    raise ValueError(f'learning_rate={config.learning_rate!r} / scale_learning_rate={config.scale_learning_rate!r} '
                     'must be >= 0')
  if config.lr_schedule == 'piecewise' and len(config.lr_boundaries_epochs) != len(config.lr_values):
    raise ValueError(f'lr_boundaries_epochs={tuple(config.lr_boundaries_epochs)} and '
                     f'lr_values={tuple(config.lr_values)} must have the same length')
  if not config.ternary_kernel_lr_multiplier > 0:
    raise ValueError(f'ternary_kernel_lr_multiplier={config.ternary_kernel_lr_multiplier!r} must be > 0')
  if not 0.0 <= config.target_accuracy <= 1.0:
    raise ValueError(f'target_accuracy={config.target_accuracy!r} is out of range: allowed is 0 (off) to 1')
  if config.export.packing not in ('2bit', 'base3'):
    raise ValueError(f'export.packing={config.export.packing!r} is unknown: allowed are 2bit, base3')


def flatten(d, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# Guarded keys added after workdirs already existed: a saved config without one ran with this value.
VALUE_IF_ABSENT = {'ternary_kernel_lr_multiplier': 1.0}


def changed_guarded_fields(saved: dict, current: dict) -> list[str]:
  a, b = {**VALUE_IF_ABSENT, **flatten(saved)}, flatten(current)
  keys = sorted(set(a) | set(b))
  if b.get('quant.method') != 'ttq':  # only TTQ runs use it (and only then is it in the optimizer state)
    keys = [k for k in keys if k != 'ternary_kernel_lr_multiplier']
  return [k for k in keys if k.startswith(GUARDED_PREFIXES) and
          json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def prepare_workdir(config, workdir: str, write: bool = True) -> None:
  """Creates `workdir` (or fails in one line), refuses a changed model/data config, saves config.json."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix='.write_test'):
      pass
  except OSError as e:
    raise ValueError(f'workdir={workdir!r} is not writable: {e.strerror or e}') from None
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError):
      saved = None
    if saved is not None:
      changed = changed_guarded_fields(saved, current)
      if changed and not config.allow_config_change:
        details = ', '.join(f'{k}: {flatten(saved).get(k)!r} -> {flatten(current).get(k)!r}' for k in changed[:6])
        raise ValueError(f'workdir {workdir} holds a run with a different model/data config ({details}); '
                         'use a new --workdir or pass --config.allow_config_change=true')
  if write:
    write_config(config, workdir)


def write_config(config, workdir: str) -> None:
  """Saves the run's config as WORKDIR/config.json (atomically, process 0 only)."""
  import jax
  if jax.process_index() == 0:
    path = os.path.join(workdir, 'config.json')
    with open(path + '.tmp', 'w') as f:
      json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)
