"""What `main.py` hands off to: process setup, then one of the modes on a workdir.

Every mode has the same shape, `mode(config, workdir, **python_only_extras) -> result dict`; the
CLI passes no extras (it builds everything from the config).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

from ttq_jax.errors import ConfigError

# --mode -> 'module:function' (imported when used, so `main` can list the modes without importing JAX)
MODES = {
    'train': 'ttq_jax.train:train_and_evaluate',
    'eval': 'ttq_jax.evaluation:evaluate_workdir',
    'export': 'ttq_jax.export:export_workdir',
    'sample': 'ttq_jax.sampling:sample_workdir',
}


def mode_fn(mode: str) -> Callable[..., dict[str, Any]]:
  if mode not in MODES:
    raise ConfigError(f'mode={mode!r} is unknown: allowed are {", ".join(MODES)}')
  module, name = MODES[mode].split(':')
  return getattr(importlib.import_module(module), name)


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """jax.distributed with explicit flags; else auto-detection of a cluster; single process: skip."""
  import jax
  given = [x is not None for x in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ConfigError('multi-host needs all of --coordinator_address, --num_processes and --process_id')
    # CPU processes need a collectives backend for cross-process reductions (no effect on GPU/TPU).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return
  try:
    jax.distributed.initialize()
  except (ValueError, RuntimeError) as e:  # no cluster detected: a single process
    logging.debug('jax.distributed not initialised (%s); single process', e)


def run(config, workdir: str, mode: str = 'train', **distributed) -> dict[str, Any]:
  fn = mode_fn(mode)
  initialize_distributed(**distributed)
  import jax
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)
  logging.info('JAX %s: process %d of %d, %d local / %d global devices (%s)', jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  return fn(config, workdir)
