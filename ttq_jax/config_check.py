"""Config validation: every bad value is a one-line ConfigError (a workdir's saved config: `workdirs`).

The allowed values of each choice are the keys of the dispatch table that the code runs through,
so nothing is allowed here that has no code behind it.
"""

from __future__ import annotations

import functools
import json
import os
import re

from flax import traverse_util

from ttq_jax import augment
from ttq_jax import datasets
from ttq_jax import export_format
from ttq_jax import models
from ttq_jax import optim
from ttq_jax import programs
from ttq_jax import state as state_lib
from ttq_jax import steps as steps_lib
from ttq_jax import tasks
from ttq_jax.errors import ConfigError
from ttq_jax.quant import SCALE_INITS, QuantConfig

# config key -> the dispatch table that owns its allowed values
CHOICES = {
    'model.name': models.MODELS,
    'model.bn_bias_init': models.BN_BIAS_INITS,
    'data.name': datasets.DATASETS,
    'data.train_crop': augment.TRAIN_CROPS,
    'quant.scale_init': SCALE_INITS,  # or None: the method's own
    'dtype': state_lib.DTYPES,
    'optimizer': optim.OPTIMIZERS,
    'lr_schedule': optim.SCHEDULES,
    'scale_optimizer': optim.SCALE_OPTIMIZERS,
    'export.packing': export_format.PACKINGS,
    'export.bn_statistics': export_format.BN_STATISTICS,
    'xla_cpu_ynn_fusion': programs.YNN_FUSION_MODES,
}
POSITIVE_INTS = ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps')
def _get(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


SCHEMA_FILE = os.path.join(os.path.dirname(__file__), 'config_schema.json')


@functools.cache
def schema() -> dict:
  """{dotted key: default} of every config key, as `configs/base.py` (which documents them) defines them;
  `python -m configs.base` writes the file (a test checks that it matches)."""
  with open(SCHEMA_FILE) as f:
    return json.load(f)


def schema_keys() -> set[str]:
  """Every config key (flattened)."""
  return set(schema())


def flatten(tree: dict) -> dict:
  """{dotted key: value} of a nested config dict (the one flattener of configs)."""
  return traverse_util.flatten_dict(tree, sep='.')


def check_keys(config) -> None:
  """Refuses a key that `configs/base.py` does not have (as the command line does), naming close matches."""
  import difflib  # noqa: PLC0415
  known = schema_keys()
  unknown = sorted(set(flatten(config.to_dict())) - known)
  if unknown:
    close = difflib.get_close_matches(unknown[0], sorted(known), n=3)
    raise ConfigError(f'config key {unknown[0]!r} is unknown' + (f': did you mean {", ".join(close)}?' if close else
                                                                  ' (configs/base.py lists every key)'))


def validate(config, *, custom_model: bool = False) -> None:
  """Raises ConfigError naming the first bad value or unknown key and what is allowed (`custom_model`: the
  model is the caller's own, so `model.name` is not looked at)."""
  check_keys(config)
  for key, table in CHOICES.items():
    if custom_model and key == 'model.name':
      continue
    value = _get(config, key)
    if key == 'data.name' and value == datasets.USER_DATA_NAME and config.data.user_dataset:
      continue  # your own data: its facts are in the config
    if key == 'quant.scale_init' and value is None:
      continue
    if value not in table:
      raise ConfigError(f'{key}={value!r} is unknown: allowed are {", ".join(sorted(table))}')
  info = datasets.dataset_info(config.data)
  min_size = 0 if custom_model else models.MIN_IMAGE_SIZE.get(config.model.name, 0)
  if len(info.input_shape) == 3 and min(info.input_shape[:2]) < min_size:
    fits = [n for n, entry in datasets.DATASETS.items() if len(entry.input_shape) == 3 and min(entry.input_shape[:2]) >= min_size]
    raise ConfigError(f'model.name={config.model.name!r} needs images of at least {min_size}x{min_size}, but '
                      f'data.name={config.data.name!r} has {info.input_shape[0]}x{info.input_shape[1]}: '
                      f'allowed datasets for it are {", ".join(fits)}')
  try:
    method = QuantConfig.from_mapping(config.quant).spec
    method.check_scale_init(config.quant.scale_init)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.normalize_init and method.trained_scales and not method.ttq_settings:
    raise ConfigError(f'normalize_init=True does not apply to quant.method={config.quant.method!r} (its scale starts '
                      'from the kernel as it is): allowed is False')
  try:
    re.compile(config.quant.full_precision_layers)
  except re.error as e:
    raise ConfigError(f'quant.full_precision_layers={config.quant.full_precision_layers!r} is not a regex ({e}): '
                      f"allowed are '{models.EDGES}', '' or a regex over module paths") from None
  held_out = config.data.validation_examples
  if info.own_validation and (held_out or config.data.limit_examples):
    key = 'validation_examples' if held_out else 'limit_examples'
    raise ConfigError(f'data.{key}={config.data[key]!r}: {config.data.name} has its own validation split and is '
                      'read whole: allowed is 0')
  size = min(info.train_size, config.data.limit_examples or info.train_size)
  if held_out and not 0 < held_out < size:
    raise ConfigError(f'data.validation_examples={held_out!r} must be 0 (none) or between 1 and {size - 1} '
                      f'(the training split has {size} examples)')
  ghost = config.model.bn_ghost_batch_size
  if ghost < 0 or (ghost and config.batch_size % ghost):
    raise ConfigError(f'model.bn_ghost_batch_size={ghost!r} must be 0 (BN over the whole batch) or divide '
                      f'batch_size={config.batch_size}')
  for key in POSITIVE_INTS:
    if int(_get(config, key)) <= 0:
      raise ConfigError(f'{key}={_get(config, key)!r} must be a positive integer')
  if not 0 < config.lease_renew_s < config.lease_timeout_s:
    raise ConfigError(f'lease_renew_s={config.lease_renew_s!r} / lease_timeout_s={config.lease_timeout_s!r}: allowed '
                      'is 0 < lease_renew_s < lease_timeout_s (a lease must be renewed before it expires)')
  examples = datasets.train_size(config.data)
  if config.batch_size > examples:
    raise ConfigError(f'batch_size={config.batch_size!r} is larger than the training split ({examples} examples of '
                      f'{config.data.name}): allowed is 1 to {examples}')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError(f'num_epochs={config.num_epochs!r} must be > 0 (or set num_train_steps > 0)')
  if config.learning_rate < 0 or config.scale_learning_rate < 0:
    raise ConfigError(f'learning_rate={config.learning_rate!r} / scale_learning_rate={config.scale_learning_rate!r} '
                      'must be >= 0')
  if config.lr_schedule == 'piecewise' and len(config.lr_boundaries_epochs) != len(config.lr_values):
    raise ConfigError(f'lr_boundaries_epochs={tuple(config.lr_boundaries_epochs)} and '
                      f'lr_values={tuple(config.lr_values)} must have the same length')
  if not config.ternary_kernel_lr_multiplier > 0:
    raise ConfigError(f'ternary_kernel_lr_multiplier={config.ternary_kernel_lr_multiplier!r} must be > 0')
  if not 0.0 <= config.target_accuracy <= 1.0:
    raise ConfigError(f'target_accuracy={config.target_accuracy!r} is out of range: allowed is 0 (off) to 1')
  if config.target_accuracy and tasks.TASKS[info.task].target_metric is None:
    raise ConfigError(f'target_accuracy={config.target_accuracy!r} applies to classification; data.name='
                      f'{config.data.name!r} is a {info.task} task without accuracy: allowed is 0 (off)')
  if config.fp_warmup_steps < 0:
    raise ConfigError(f'fp_warmup_steps={config.fp_warmup_steps!r} must be >= 0 (0: fp_warmup_epochs decides)')
  if config.init_from and steps_lib.has_fp_warmup(config) and steps_lib.is_quantized(config):
    raise ConfigError(f'init_from={config.init_from!r} and a full-precision warm-up (fp_warmup_epochs='
                      f'{config.fp_warmup_epochs!r}, fp_warmup_steps={config.fp_warmup_steps!r}) are both '
                      'set: init_from is the full-precision warm start, so set both to 0 (or drop init_from)')
  if config.scale_optimizer == 'adam' and config.learning_rate == 0:
    raise ConfigError("learning_rate=0 with scale_optimizer='adam': the scales' schedule is the weights' schedule "
                      'rescaled to scale_learning_rate, so learning_rate must be > 0')


def warm_start(config) -> str:
  """'required': the run refuses to start without a full-precision checkpoint (`init_from`); 'in_run': its
  own full-precision warm-up (`fp_warmup_epochs`); 'none': ternary from the first step (or a FP run)."""
  if not steps_lib.is_quantized(config):
    return 'none'
  if config.warm_start_config:
    return 'required'
  return 'in_run' if steps_lib.has_fp_warmup(config) else 'none'


def check_warm_start(config) -> None:
  """A row that fine-tunes a full-precision model (`warm_start_config` set) never trains from scratch."""
  if warm_start(config) == 'required' and not config.init_from and not steps_lib.has_fp_warmup(config):
    raise ConfigError(f'this config fine-tunes a full-precision model and init_from is empty: first run '
                      f'`python -m ttq_jax.main --config {config.warm_start_config} --workdir FP_WORKDIR`, then pass '
                      f'--config.init_from=FP_WORKDIR (or --config.fp_warmup_epochs=N for an in-run warm-up)')
