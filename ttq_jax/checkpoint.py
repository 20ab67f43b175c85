"""Orbax checkpoints of the train state and the input iterator, with fallback on corrupt steps, and
the warm start of a run from another run's checkpoint (`init_from`)."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from ttq_jax import files
from ttq_jax.errors import CheckpointError


def checkpoint_dir(workdir: str) -> str:
  return files.join(files.resolve(workdir), 'checkpoints')


def create_manager(workdir: str, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                   read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, save_interval_steps=0 if read_only else save_interval_steps,
      create=not read_only, enable_async_checkpointing=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)), force=force)


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs (with the current shardings) to restore into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _restore_step(manager, step: int, abstract, legacy: Sequence[Callable]):
  args = lambda a: ocp.args.Composite(state=ocp.args.StandardRestore(a), data=ocp.args.JsonRestore())
  try:
    restored = manager.restore(step, args=args(abstract))
    return restored['state'], restored['data']
  except ValueError as e:
    if 'tree structures do not match' not in str(e):
      raise
    for older_format in legacy:  # a checkpoint written by an earlier version of the state
      older_abstract, convert = older_format(abstract)
      try:
        restored = manager.restore(step, args=args(older_abstract))
      except ValueError:
        continue
      return convert(restored['state']), restored['data']
    raise


def restore_latest(manager: ocp.CheckpointManager, target: Any, step: int | None = None,
                   legacy: Sequence[Callable] = ()):
  """Restores the newest readable step (or exactly `step`) into `target`'s structure/shardings.

  Returns (step, state, data_state) or None when the directory holds no checkpoint. Unreadable
  newer steps are skipped with a warning; when no step is readable raises CheckpointError and
  deletes nothing. `legacy`: functions `abstract -> (abstract of an older state format, converter of
  such a restored state to the current one)`, tried when the on-disk tree does not match `target`.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'eval_step={step} has no checkpoint in {manager.directory}: '
                            f'available steps are {", ".join(map(str, sorted(steps)))}')
    steps = [step]
  abstract = abstract_like(target)
  errors = []
  for s in steps:
    try:
      state, data = _restore_step(manager, s, abstract, legacy)
      if errors:
        logging.warning('restored step %d after skipping unreadable newer steps: %s', s, '; '.join(errors))
      return s, state, dict(data or {})
    except Exception as e:  # orbax raises many types for truncated / missing files
      msg = f'step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
      logging.warning('checkpoint %s is unreadable, trying an older one', msg)
      errors.append(msg)
  if all('tree structures do not match' in e for e in errors):
    raise CheckpointError(f'the checkpoints in {manager.directory} hold another state structure than this run builds '
                          '(other model, quantization or optimizer settings, e.g. ternary_kernel_lr_multiplier); '
                          'use the config they were written with; nothing was deleted')
  raise CheckpointError(f'no readable checkpoint in {manager.directory} ({len(errors)} tried; newest error: '
                        f'{errors[0]}); nothing was deleted')


def quarantine_newer(manager: ocp.CheckpointManager, workdir: str, step: int) -> list[str]:
  """Moves steps newer than `step` (unreadable ones we fell back from) to WORKDIR/corrupt_checkpoints/
  so training can save those steps again; nothing is deleted. Returns the new paths."""
  moved = []
  newer = [s for s in manager.all_steps() if s > step]
  if newer and jax.process_index() == 0:
    dest_root = files.join(files.resolve(workdir), 'corrupt_checkpoints')
    files.makedirs(dest_root)
    for s in newer:
      src = files.join(checkpoint_dir(workdir), str(s))
      dest = files.join(dest_root, f'step_{s}')
      n = 0
      while files.exists(dest):
        n += 1
        dest = files.join(dest_root, f'step_{s}.{n}')
      files.move(src, dest)
      moved.append(dest)
      logging.warning('moved unreadable checkpoint step %d to %s', s, dest)
  if newer:
    from jax.experimental import multihost_utils
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('ttq_jax_quarantine')
    manager.reload()
  return moved


def _copy_matching(dst, src) -> tuple[dict, list[str], list[str]]:
  """(`dst` with every leaf that `src` has at the same path and shape replaced by `src`'s value,
  the copied paths, the paths kept at their `dst` value)."""
  flat_dst = traverse_util.flatten_dict(flax.core.unfreeze(dst), sep='/', keep_empty_nodes=True)
  flat_src = traverse_util.flatten_dict(flax.core.unfreeze(src), sep='/')
  copied = {k: jnp.asarray(flat_src[k], v.dtype) for k, v in flat_dst.items()
            if k in flat_src and np.shape(flat_src[k]) == np.shape(v)}
  kept = [k for k, v in flat_dst.items() if k not in copied and v is not traverse_util.empty_node]
  return traverse_util.unflatten_dict({**flat_dst, **copied}, sep='/'), list(copied), kept


def params_sha256(params) -> str:
  """SHA-256 over a params tree: each leaf's slash-joined path, dtype, shape and bytes, in sorted path
  order. Equal digests mean the same tensors, so two runs that report one started from the same weights."""
  digest = hashlib.sha256()
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  for path in sorted(flat):
    value = np.ascontiguousarray(np.asarray(flat[path]))
    digest.update(f'{path}|{value.dtype.str}|{value.shape}|'.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _read_warm_start(source: str) -> tuple[dict, int | None]:
  """(the variables to warm-start from, their step or None): the newest checkpoint of a ttq_jax workdir, or
  an orbax checkpoint directory (e.g. `ocp.StandardCheckpointer().save(path, {'params': ..., 'batch_stats':
  ...})` of your own FP training; a bare params tree works too)."""
  if not files.isdir(checkpoint_dir(source)) and files.isfile(files.join(source, '_CHECKPOINT_METADATA')):
    tree = ocp.StandardCheckpointer().restore(files.resolve(source))
    return (tree if 'params' in tree else {'params': tree}), None
  mngr = create_manager(source, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f'init_from={source!r} has no checkpoint in {checkpoint_dir(source)} and is not an orbax '
                          'checkpoint directory')
  step = max(steps)
  return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state'], int(step)


def load_init_from(state: Any, workdir_from: str) -> tuple[Any, dict]:
  """Warm start (the paper's fine-tuning recipe): copies the params and BN statistics of an FP run of the
  same (plain) model, a ttq_jax workdir or an orbax checkpoint, into `state` wherever path and shape
  match, and starts a fresh optimizer state. A kernel of `state` that the source lacks is an error. The
  switch to ternary (scale init) is the caller's.

  Returns (the new state, a record of the source: {'path', 'step' (None for an orbax directory),
  'params_sha256' (`params_sha256` of the source's params as read)}).
  """
  restored, source_step = _read_warm_start(workdir_from)
  params, copied, kept = _copy_matching(jax.device_get(state.params), restored['params'])
  batch_stats, copied_stats, kept_stats = _copy_matching(jax.device_get(state.batch_stats),
                                                         restored.get('batch_stats', {}))
  copied, kept = copied + copied_stats, kept + kept_stats
  missing = [k for k in kept if k.rsplit('/', 1)[-1] == 'kernel']
  if missing:
    raise CheckpointError(f'init_from={workdir_from!r} has no kernel of the same path and shape for {len(missing)} of '
                          f'this model\'s kernels ({", ".join(missing[:4])}{", ..." if len(missing) > 4 else ""}): '
                          'it is not a checkpoint of the same (plain) model')
  logging.info('init_from %s: copied %d tensors, kept %d at init (%s)', workdir_from, len(copied), len(kept),
               ', '.join(kept[:8]))
  new = state.replace(params=params, batch_stats=batch_stats)
  new = new.replace(opt_state=state.tx.init(new.params))
  record = {'path': workdir_from, 'step': source_step, 'params_sha256': params_sha256(restored['params'])}
  return jax.device_put(new, jax.tree.map(lambda x: x.sharding, state)), record
