"""Orbax checkpoints of the train state and the input iterator, with fallback on corrupt steps."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No readable checkpoint (reported as one line)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


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


def restore_latest(manager: ocp.CheckpointManager, target: Any, step: int | None = None):
  """Restores the newest readable step (or exactly `step`) into `target`'s structure/shardings.

  Returns (step, state, data_state) or None when the directory holds no checkpoint. Unreadable
  newer steps are skipped with a warning; when no step is readable raises CheckpointError and
  deletes nothing.
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
      restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                            data=ocp.args.JsonRestore()))
      if errors:
        logging.warning('restored step %d after skipping unreadable newer steps: %s', s, '; '.join(errors))
      return s, restored['state'], dict(restored['data'] or {})
    except Exception as e:  # orbax raises many types for truncated / missing files
      msg = f'step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
      logging.warning('checkpoint %s is unreadable, trying an older one', msg)
      errors.append(msg)
  raise CheckpointError(f'no readable checkpoint in {manager.directory} ({len(errors)} tried; newest error: '
                        f'{errors[0]}); nothing was deleted')


def quarantine_newer(manager: ocp.CheckpointManager, workdir: str, step: int) -> list[str]:
  """Moves steps newer than `step` (unreadable ones we fell back from) to WORKDIR/corrupt_checkpoints/
  so training can save those steps again; nothing is deleted. Returns the new paths."""
  moved = []
  newer = [s for s in manager.all_steps() if s > step]
  if newer and jax.process_index() == 0:
    dest_root = os.path.join(os.path.abspath(workdir), 'corrupt_checkpoints')
    os.makedirs(dest_root, exist_ok=True)
    for s in newer:
      src = os.path.join(checkpoint_dir(workdir), str(s))
      dest = os.path.join(dest_root, f'step_{s}')
      n = 0
      while os.path.exists(dest):
        n += 1
        dest = os.path.join(dest_root, f'step_{s}.{n}')
      os.rename(src, dest)
      moved.append(dest)
      logging.warning('moved unreadable checkpoint step %d to %s', s, dest)
  if newer:
    from jax.experimental import multihost_utils
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('ttq_jax_quarantine')
    manager.reload()
  return moved
