"""Config validation and the workdir guard: every bad value is a one-line ConfigError.

The allowed values of each choice are the keys of the dispatch table that the code runs through,
so nothing is allowed here that has no code behind it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re

import ml_collections

from ttq_jax import augment
from ttq_jax import datasets
from ttq_jax import export_format
from ttq_jax import files
from ttq_jax import models
from ttq_jax import optim
from ttq_jax import programs
from ttq_jax import state as state_lib
from ttq_jax import steps as steps_lib
from ttq_jax.errors import ConfigError
from ttq_jax.quant import METHODS, SCALE_INITS, QuantConfig

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
# Fields that change what the model or data are: a workdir trained with other values is refused.
GUARDED_PREFIXES = ('model.', 'quant.', 'data.name', 'data.seq_len', 'data.limit_examples', 'data.validation_examples', 'dtype', 'seed', 'fp_warmup_epochs',
                    'fp_warmup_steps', 'init_from', 'ternary_kernel_lr_multiplier')
# What `--mode eval` / `--mode export` may change of a workdir's saved config: how to read and evaluate it, never
# what was trained (WORKDIR/config.json decides that).
EVAL_OVERRIDABLE = ('eval_batch_size', 'eval_step', 'restore_from', 'data.data_dir', 'data.worker_processes',
                    'data.num_threads', 'data.prefetch_batches', 'bn_recalibration_batches', 'export.packing',
                    'export.bn_statistics',
                    'log_every_steps', 'mesh_shape', 'mesh_axes', 'compilation_cache_dir', 'xla_cpu_ynn_fusion',
                    'allow_config_change')


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
  if config.fp_warmup_steps < 0:
    raise ConfigError(f'fp_warmup_steps={config.fp_warmup_steps!r} must be >= 0 (0: fp_warmup_epochs decides)')
  if config.init_from and steps_lib.has_fp_warmup(config) and steps_lib.is_quantized(config):
    raise ConfigError(f'init_from={config.init_from!r} and a full-precision warm-up (fp_warmup_epochs='
                      f'{config.fp_warmup_epochs!r}, fp_warmup_steps={config.fp_warmup_steps!r}) are both '
                      'set: init_from is the full-precision warm start, so set both to 0 (or drop init_from)')
  if config.scale_optimizer == 'adam' and config.learning_rate == 0:
    raise ConfigError("learning_rate=0 with scale_optimizer='adam': the scales' schedule is the weights' schedule "
                      'rescaled to scale_learning_rate, so learning_rate must be > 0')


# What a row needs before its ternary training starts (the `warm_start` of `reproduce.py --describe`).
WARM_STARTS = ('required', 'in_run', 'none')


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


def flatten(d, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# Guarded keys added after workdirs already existed: a saved config without one ran with this value.
VALUE_IF_ABSENT = {'ternary_kernel_lr_multiplier': 1.0, 'quant.k': 0.7, 'model.bn_unbiased_variance': False,
                   'model.bn_bias_init': 'zeros', 'fp_warmup_steps': 0, 'quant.activations': 'float',
                   'model.depth': 0, 'model.width': 0, 'model.num_heads': 0, 'model.mlp_width': 0,
                   'model.activation': '', 'data.seq_len': 256, 'quant.scale_granularity': 'tensor'}


def complete(saved: dict) -> ml_collections.ConfigDict:
  """A saved config (config.json, an export's metadata) as a locked config with every key of this version: the
  saved values as the run ran them (`saved_values`), keys added since at their defaults."""
  effective = ml_collections.ConfigDict()
  for key, value in {**schema(), **saved_values(saved)}.items():
    node = effective
    for part in key.split('.')[:-1]:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[key.split('.')[-1]] = _tuples(value)
  effective.lock()
  return effective


def saved_values(saved: dict) -> dict:
  """A saved config.json, flattened, as the run it describes ran: keys added since take `VALUE_IF_ABSENT`, and
  a config saved before `quant.k` existed ran TWN with TWN's own rule whatever its `quant.threshold` said."""
  flat = flatten(saved)
  out = {**VALUE_IF_ABSENT, **flat}
  if 'quant.k' not in flat and out.get('quant.method') == 'twn':
    out['quant.threshold'] = None
  return out


def canonical_quant(flat: dict) -> dict:
  """`flat` (a flattened config) with `quant.threshold` and `quant.scale_init` as the rules in force: None is the
  method's own, and a method without trained scales has no scale init."""
  flat = dict(flat)
  method = METHODS.get(flat.get('quant.method'))
  if flat.get('quant.threshold') is None:
    flat['quant.threshold'] = method.own_threshold if method else None
  if method and not method.trained_scales:
    flat['quant.scale_init'] = None
  elif flat.get('quant.scale_init') is None:
    flat['quant.scale_init'] = method.own_scale_init if method else None
  return flat


def changed_guarded_fields(saved: dict, current: dict) -> list[str]:
  a = canonical_quant(saved_values(saved))
  b = canonical_quant({**VALUE_IF_ABSENT, **flatten(current)})
  keys = sorted(set(a) | set(b))
  method = METHODS.get(b.get('quant.method'))
  if not (method and method.trained_scales):  # only TTQ runs use it (and only then is it in the optimizer state)
    keys = [k for k in keys if k != 'ternary_kernel_lr_multiplier']
  return [k for k in keys if k.startswith(GUARDED_PREFIXES) and
          json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def check_writable(workdir: str) -> None:
  """Creates `workdir` and writes and deletes a probe file in it, or fails in one line naming it."""
  probe = files.join(workdir, f'.write_test-{os.getpid()}')
  try:
    files.makedirs(workdir)
    files.write_text(probe, '')
    files.remove(probe)
  except Exception as e:  # noqa: BLE001 - any store error (missing bucket, no permission, unreachable) is the answer
    reason = getattr(e, 'strerror', None) or (str(e).splitlines() or [type(e).__name__])[0]
    raise ConfigError(f'workdir={workdir!r} is not writable: {reason}') from None


def prepare_workdir(config, workdir: str, write: bool = True) -> None:
  """Creates `workdir` (or fails in one line), refuses a changed model/data config, saves config.json."""
  check_writable(workdir)
  path = files.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort())
  if files.exists(path):
    try:
      saved = json.loads(files.read_text(path))
    except (OSError, ValueError):
      saved = None
    if saved is not None:
      changed = changed_guarded_fields(saved, current)
      if changed and not config.allow_config_change:
        details = ', '.join(f'{k}: {flatten(saved).get(k)!r} -> {flatten(current).get(k)!r}' for k in changed[:6])
        raise ConfigError(f'workdir {workdir} holds a run with a different model/data config ({details}); '
                          'use a new --workdir or pass --config.allow_config_change=true')
  if write:
    write_config(config, workdir)


def write_config(config, workdir: str) -> None:
  """Saves the run's config as WORKDIR/config.json (atomically, process 0 only)."""
  import jax
  if jax.process_index() == 0:
    files.write_json(files.join(workdir, 'config.json'), json.loads(config.to_json_best_effort()))


# --------------------------------------------------------------------------- a workdir's own config


def _tuples(value):
  """JSON lists back to the tuples every sequence-valued config key holds."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  for part in parents:
    config = config[part]
  config[leaf] = value


def check_overrides(workdir: str, keys, config=None) -> None:
  """`--mode eval` / `export`: an explicit `--config.KEY=VALUE` may only change `EVAL_OVERRIDABLE` keys of
  a workdir that has a saved config (it decides everything else); repeating a saved value changes nothing and
  passes (`config`: the config with the overrides applied)."""
  path = files.join(workdir, 'config.json')
  bad = sorted(k for k in keys if k not in EVAL_OVERRIDABLE)
  if not bad or not files.exists(path):
    return
  saved = canonical_quant(saved_values(json.loads(files.read_text(path))))
  given = canonical_quant({**VALUE_IF_ABSENT, **flatten(json.loads(config.to_json_best_effort()))}) if config else {}
  changed = [k for k in bad if not config or json.dumps(given.get(k), sort_keys=True) != json.dumps(saved.get(k), sort_keys=True)]
  if changed:
    raise ConfigError(f'--config.{changed[0]} cannot be changed when evaluating or exporting {workdir}: its config.json '
                      f'says what was trained ({changed[0]}={saved.get(changed[0])!r}); allowed to change are '
                      f'{", ".join(EVAL_OVERRIDABLE)}')


def workdir_config(config, workdir: str):
  """The config of what `workdir` holds: its saved config.json, with the `EVAL_OVERRIDABLE` keys taken from
  `config` (None: the saved config alone). Any other key where `config` differs from the saved one (e.g. a
  config file without the overrides the run was trained with) is named in one warning and the saved value
  is used. A workdir without config.json: `config` as it is (required then)."""
  path = files.join(workdir, 'config.json')
  if not files.exists(path):
    if config is None:
      raise ConfigError(f'workdir {workdir} has no config.json: pass --config (the config it was trained with)')
    return config
  try:
    saved = json.loads(files.read_text(path))
  except ValueError as e:
    raise ConfigError(f'{path} is not readable JSON ({e}): pass --config and restore it') from None
  saved_flat = saved_values(saved)
  if config is None:
    return complete(saved)
  effective = ml_collections.ConfigDict(config.to_dict())  # `config`'s keys and types, unlocked
  given = canonical_quant({**VALUE_IF_ABSENT, **flatten(json.loads(config.to_json_best_effort()))})
  same_rule = canonical_quant(saved_flat)
  differ = []
  for key, value in saved_flat.items():
    if key in EVAL_OVERRIDABLE:
      continue
    if json.dumps(given.get(key), sort_keys=True) != json.dumps(same_rule.get(key), sort_keys=True):
      differ.append(f'{key} (saved {value!r}, given {given.get(key)!r})')
    try:
      _set(effective, key, _tuples(value))
    except (KeyError, AttributeError):  # a key this version no longer has
      continue
  if differ:
    logging.warning('the config given differs from %s in %s: the saved values are used (what may change for eval / '
                    'export: %s)', path, ', '.join(differ[:6]) + (f' and {len(differ) - 6} more' if len(differ) > 6 else ''),
                    ', '.join(EVAL_OVERRIDABLE))
  effective.lock()
  return effective
