"""What `main.py` hands off to: process setup, then train / eval / export of a workdir."""

from __future__ import annotations

import logging

import jax

from ttq_jax import checkpoint as ckpt
from ttq_jax import input_pipeline

USER_ERRORS = (ValueError, input_pipeline.DataError, ckpt.CheckpointError, FloatingPointError, KeyError)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """jax.distributed with explicit flags; else auto-detection of a cluster; single process: skip."""
  given = [x is not None for x in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ValueError('multi-host needs all of --coordinator_address, --num_processes and --process_id')
    # CPU processes need a collectives backend for cross-process reductions (no effect on GPU/TPU).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:  # no cluster detected: a single process
    logging.debug('jax.distributed not initialised (%s); single process', e)


def run(config, workdir: str, mode: str = 'train', **distributed) -> dict:
  initialize_distributed(**distributed)
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  from ttq_jax import evaluation, train
  if mode == 'train':
    return train.train_and_evaluate(config, workdir)
  if mode == 'eval':
    return evaluation.evaluate_workdir(config, workdir)
  if mode == 'export':
    from ttq_jax import export
    return export.export_workdir(config, workdir)
  raise ValueError(f'mode={mode!r} is unknown: allowed are train, eval, export')
