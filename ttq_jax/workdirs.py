"""A workdir: its saved config (read, completed with this version's keys, compared with a given config, what
eval / export may override), the guard against training another model into it, and restoring its run.

    config = workdirs.workdir_config(None, 'workdirs/run')          # what was trained there
    mesh, step, state, data_state = workdirs.restore(None, 'workdirs/run')

WORKDIR/config.json decides what a workdir holds; a key it lacks means that key's default (the one defaults table:
`ttq_jax/config_schema.json`, written from `configs/base.py`), then the named `MIGRATIONS`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import ml_collections

from ttq_jax import checkpoint as ckpt
from ttq_jax import files
from ttq_jax import schema_config
from ttq_jax import state as state_lib
from ttq_jax.config_check import flatten, schema
from ttq_jax.errors import ConfigError
from ttq_jax.quant import METHODS

# Fields that change what the model or data are: a workdir trained with other values is refused.
GUARDED_PREFIXES = ('model.', 'quant.', 'data.name', 'data.seq_len', 'data.limit_examples', 'data.validation_examples', 'dtype', 'seed', 'fp_warmup_epochs',
                    'fp_warmup_steps', 'init_from', 'ternary_kernel_lr_multiplier')
# What `--mode eval` / `--mode export` may change of a workdir's saved config: how to read and evaluate it, never
# what was trained (WORKDIR/config.json decides that).
EVAL_OVERRIDABLE = ('eval_batch_size', 'eval_step', 'restore_from', 'data.data_dir', 'data.worker_processes',
                    'data.num_threads', 'data.prefetch_batches', 'bn_recalibration_batches', 'export.packing',
                    'export.bn_statistics',
                    'log_every_steps', 'mesh_shape', 'mesh_axes', 'compilation_cache_dir', 'xla_cpu_ynn_fusion',
                    'allow_config_change', 'eval_dir', 'sample.prompt', 'sample.num_bytes', 'sample.temperature', 'sample.seed')




def complete(saved: dict) -> ml_collections.ConfigDict:
  """A saved config (config.json, an export's metadata) as a locked config with every key of this version: the
  saved values as the run ran them (`saved_values`), keys added since at their defaults."""
  effective = schema_config.nested(saved_values(saved))
  effective.lock()
  return effective


def twn_before_quant_k(saved_flat: dict, values: dict) -> dict:
  """Migration: a config saved before `quant.k` existed ran TWN with TWN's own rule whatever its `quant.threshold`
  said (the meaning of that value changed when `quant.k` came)."""
  if 'quant.k' not in saved_flat and values.get('quant.method') == 'twn':
    return {**values, 'quant.threshold': None}
  return values


# Changes of a value's meaning since workdirs were first written, applied in order to a saved config.
MIGRATIONS = (twn_before_quant_k,)


def saved_values(saved: dict) -> dict:
  """A saved config.json, flattened, as the run it describes ran: a key it lacks means that key's default
  (`config_check.schema()`, the one defaults table), then the `MIGRATIONS`."""
  flat = flatten(saved)
  values = {**schema(), **flat}
  for migrate in MIGRATIONS:
    values = migrate(flat, values)
  return values


def differing_keys(a: dict, b: dict, keys) -> list[str]:
  """The `keys` whose values differ between the flattened configs `a` and `b` (the one comparison of configs)."""
  return [k for k in keys if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)]


def given_values(config) -> dict:
  """A config given now (a ConfigDict), flattened, with every key (`schema()` defaults where it lacks one)."""
  return {**schema(), **flatten(json.loads(config.to_json_best_effort()))}


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
  b = canonical_quant({**schema(), **flatten(current)})
  keys = sorted(set(a) | set(b))
  method = METHODS.get(b.get('quant.method'))
  if not (method and method.trained_scales):  # only TTQ runs use it (and only then is it in the optimizer state)
    keys = [k for k in keys if k != 'ternary_kernel_lr_multiplier']
  return differing_keys(a, b, [k for k in keys if k.startswith(GUARDED_PREFIXES)])


def check_writable(workdir: str) -> None:
  """Writes and deletes a probe file in `workdir`, or fails in one line naming it. Folders it had to create for
  the probe are removed again: a start that is refused later leaves nothing behind."""
  probe = files.join(workdir, f'.write_test-{os.getpid()}')
  created = None  # the top-most folder this probe creates (local paths; a bucket has no folders)
  if not files.is_url(workdir):
    created = os.path.abspath(workdir)
    while not os.path.exists(os.path.dirname(created)) and os.path.dirname(created) != created:
      created = os.path.dirname(created)
    created = None if os.path.exists(created) else created
  try:
    files.makedirs(workdir)
    files.write_text(probe, '')
    files.remove(probe)
  except Exception as e:  # noqa: BLE001 - any store error (missing bucket, no permission, unreachable) is the answer
    reason = getattr(e, 'strerror', None) or (str(e).splitlines() or [type(e).__name__])[0]
    raise ConfigError(f'workdir={workdir!r} is not writable: {reason}') from None
  finally:
    if created and os.path.isdir(created):
      shutil.rmtree(created, ignore_errors=True)


def has_checkpoints(workdir: str) -> bool:
  directory = ckpt.checkpoint_dir(workdir)
  return files.isdir(directory) and any(name.isdigit() for name in files.listdir(directory))


def prepare_workdir(config, workdir: str, write: bool = True) -> None:
  """Checks that `workdir` is writable (or fails in one line), refuses a changed model/data config of a run in it
  (a config.json without any checkpoint is no run: it is replaced, with a warning), saves config.json."""
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
      details = ', '.join(f'{k}: {flatten(saved).get(k)!r} -> {flatten(current).get(k)!r}' for k in changed[:6])
      if changed and not config.allow_config_change and not has_checkpoints(workdir):
        logging.warning('workdir %s holds a config.json but no checkpoint (a start that never saved a step): it is not '
                        'a run to continue; its config is replaced (%s)', workdir, details)
      elif changed and not config.allow_config_change:
        raise ConfigError(f'workdir {workdir} holds a run with a different model/data config ({details}); '
                          'use a new --workdir or pass --config.allow_config_change=true')
  if write:
    write_config(config, workdir)


def write_config(config, workdir: str) -> None:
  """Saves the run's config as WORKDIR/config.json (atomically, process 0 only)."""
  if jax.process_index() == 0:
    files.write_json(files.join(workdir, 'config.json'), json.loads(config.to_json_best_effort()))


# --------------------------------------------------------------------------- a workdir's own config


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
  changed = differing_keys(canonical_quant(given_values(config)), saved, bad) if config else bad
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
  effective = schema_config.nested(flatten(config.to_dict()))  # `config`'s keys and types, unlocked
  given = canonical_quant(given_values(config))
  same_rule = canonical_quant(saved_flat)
  differ = []
  for key, value in saved_flat.items():
    if key in EVAL_OVERRIDABLE:
      continue
    if differing_keys(given, same_rule, [key]):
      differ.append(f'{key} (saved {value!r}, given {given.get(key)!r})')
    try:
      _set(effective, key, schema_config.as_tuples(value))
    except (KeyError, AttributeError):  # a key this version no longer has
      continue
  if differ:
    logging.warning('the config given differs from %s in %s: the saved values are used (what may change for eval / '
                    'export: %s)', path, ', '.join(differ[:6]) + (f' and {len(differ) - 6} more' if len(differ) > 6 else ''),
                    ', '.join(EVAL_OVERRIDABLE))
  effective.lock()
  return effective


def restore(config, workdir: str, *, step: int | None = None, model=None, mesh_shape=None) -> state_lib.Restored:
  """The newest readable checkpoint of `workdir` (or exactly `step`) restored into a fresh state of the
  workdir's config (read only: nothing in the workdir changes): its saved config.json decides what was trained,
  `config` (may be None) only what `EVAL_OVERRIDABLE` lists. Raises CheckpointError when there is no checkpoint."""
  config = workdir_config(config, workdir)
  mesh, state = state_lib.create_mesh_and_state(config, model, mesh_shape)
  return state_lib.Restored(mesh, *restore_state(workdir, state, step))


def restore_state(workdir: str, state: state_lib.TrainState, step: int | None = None):
  """(step, state, data state): the newest readable checkpoint of `workdir` (or exactly `step`) in `state`'s
  structure and shardings, read only; raises CheckpointError when there is none."""
  manager = ckpt.create_manager(workdir, read_only=True)
  restored = state_lib.restore_latest(manager, state, step)
  if restored is None:
    raise ckpt.CheckpointError(f'workdir {workdir} has no checkpoints (looked in {ckpt.checkpoint_dir(workdir)})')
  return restored
