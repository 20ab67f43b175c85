"""Orbax checkpoints of the train state and the input iterator, with fallback on corrupt steps, and
the warm start of a run from another run's checkpoint (`init_from`)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import time
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


# --------------------------------------------------------------------------- reading a step
#
# What can go wrong when a step is read, and what `restore_latest` does about it:
#   corrupt    (a half-written or damaged step: missing or truncated files, DATA_LOSS / NOT_FOUND / OUT_OF_RANGE
#              from the store, no tree metadata): fall back to the newest readable older step;
#   transient  (the store did not answer: UNAVAILABLE, DEADLINE_EXCEEDED, connection errors, timeouts, HTTP 429
#              / 5xx): retry after RETRY_DELAYS_S (60 s in all, on top of gcsfs's / tensorstore's own retries),
#              then fail in one line with nothing moved;
#   structure  (the step holds another state structure: decided from the trees, not from message text): fail in
#              one line with nothing moved;
#   anything else is a bug (ours, or in a converter) and raises with its traceback, nothing moved.

RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
CORRUPT_STATUS = re.compile(r'\b(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE)\b')
TRANSIENT_STATUS = re.compile(r'\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED)\b')


class CorruptStepError(Exception):
  """A step that cannot be what was saved (e.g. no tree metadata): read as corrupt."""


class StructureMismatchError(CheckpointError):
  """The step holds another state structure than the run builds."""


def _causes(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def classify_read_error(e: BaseException) -> str:
  """'corrupt', 'transient' or 'bug' for an exception raised while reading a step: by exception type where
  one exists, otherwise by the store's status code (tensorstore puts it in the message)."""
  for x in _causes(e):
    if isinstance(x, CorruptStepError):
      return 'corrupt'
    if isinstance(x, (ConnectionError, TimeoutError, socket.timeout)):
      return 'transient'
    if isinstance(x, (FileNotFoundError, json.JSONDecodeError)):
      return 'corrupt'
    code = getattr(x, 'code', None)
    if type(x).__name__ == 'HttpError' and isinstance(code, int):  # gcsfs, after its own retries
      return 'transient' if code == 429 or code >= 500 else 'corrupt' if code == 404 else 'bug'
    message = str(x)
    if TRANSIENT_STATUS.search(message):
      return 'transient'
    if CORRUPT_STATUS.search(message) or (isinstance(x, KeyError) and 'was not found in the checkpoint' in message):
      return 'corrupt'
  return 'bug'


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{leaf path (names, as a checkpoint stores them): shape} of a pytree or a checkpoint's tree metadata."""
  return {tuple(_key_name(k) for k in path): tuple(getattr(leaf, 'shape', ()) or ())
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_shapes(manager, step: int) -> dict:
  """The leaf paths and shapes that step `step` saved for its state (its tree metadata)."""
  metadata = ocp.StandardCheckpointer().metadata(manager.directory / str(step) / 'state')
  shapes = leaf_shapes(getattr(metadata, 'item_metadata', metadata))
  if not shapes:
    raise CorruptStepError(f'step {step} has no tree metadata for its state (missing _METADATA?)')
  return shapes


def _restore_step(manager, step: int, abstract, legacy: Sequence[Callable]):
  """(state, data state) of `step`, in `abstract`'s structure or, when the step's tree is that of an older
  state format (`legacy`), converted from it. A step with another tree raises StructureMismatchError."""
  saved = _saved_shapes(manager, step)
  args = lambda a: ocp.args.Composite(state=ocp.args.StandardRestore(a), data=ocp.args.JsonRestore())
  candidates = [(abstract, lambda state: state)] + [older_format(abstract) for older_format in legacy]
  for target, convert in candidates:
    if leaf_shapes(target) == saved:
      restored = manager.restore(step, args=args(target))
      return convert(restored['state']), restored['data']
  want = leaf_shapes(abstract)
  differ = sorted(set(want.items()) ^ set(saved.items()))
  detail = ', '.join('/'.join(path) + f' {list(shape)}' for path, shape in differ[:3])
  raise StructureMismatchError(
      f'the checkpoints in {manager.directory} hold another state structure than this run builds (step {step} differs '
      f'in {len(differ)} leaves, e.g. {detail}): other model, quantization or optimizer settings (e.g. '
      'ternary_kernel_lr_multiplier, scale_granularity); use the config they were written with; nothing was moved')


def _read_with_retries(manager, step: int, abstract, legacy: Sequence[Callable]):
  """`_restore_step`, retried on transient store errors; raises CheckpointError once they are spent."""
  for attempt, delay in enumerate((*RETRY_DELAYS_S, None)):
    try:
      return _restore_step(manager, step, abstract, legacy)
    except StructureMismatchError:
      raise
    except Exception as e:  # noqa: BLE001 - classified; bugs re-raised below with their traceback
      if classify_read_error(e) != 'transient':
        raise
      first = (str(e).splitlines() or [type(e).__name__])[0][:200]
      if delay is None:
        raise CheckpointError(f'reading checkpoint step {step} in {manager.directory} failed {attempt + 1} times with a '
                              f'transient store error ({type(e).__name__}: {first}); nothing was moved: run again when '
                              'the store answers') from None
      logging.warning('checkpoint step %d: transient store error (%s: %s); retrying in %.0f s', step,
                      type(e).__name__, first, delay)
      time.sleep(delay)


def restore_latest(manager: ocp.CheckpointManager, target: Any, step: int | None = None,
                   legacy: Sequence[Callable] = ()):
  """Restores the newest readable step (or exactly `step`) into `target`'s structure/shardings.

  Returns (step, state, data_state) or None when the directory holds no checkpoint. A corrupt newer step
  is skipped with a warning (the caller may quarantine it); a transient store error is retried, then is a
  CheckpointError; a step with another state structure is a CheckpointError; anything else raises as it is.
  Nothing is moved or deleted here. `legacy`: functions `abstract -> (abstract of an older state format,
  converter of such a restored state to the current one)`, used when a step's tree is that older one.
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
      state, data = _read_with_retries(manager, s, abstract, legacy)
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - corrupt steps fall back; anything else is re-raised
      if classify_read_error(e) != 'corrupt':
        raise
      msg = f'step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
      logging.warning('checkpoint %s is unreadable (corrupt), trying an older one', msg)
      errors.append(msg)
      continue
    if errors:
      logging.warning('restored step %d after skipping corrupt newer steps: %s', s, '; '.join(errors))
    return s, state, dict(data or {})
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
