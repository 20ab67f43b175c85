"""`--mode eval`: restore a checkpoint (or load an export) and evaluate it on the test split."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax

from ttq_jax import checkpoint as ckpt
from ttq_jax import config_check
from ttq_jax import export
from ttq_jax import input_pipeline
from ttq_jax import sharding as sharding_lib
from ttq_jax import train


def _params_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def evaluate_workdir(config, workdir: str) -> dict:
  """Evaluates the newest (or `eval_step`) checkpoint; writes WORKDIR/eval/step_<N>.json."""
  config_check.validate(config)
  workdir = os.path.abspath(workdir)
  train.setup_compilation_cache(config)
  mesh = sharding_lib.create_mesh(config.mesh_shape, config.mesh_axes)
  sharding_lib.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  if config.restore_from:  # a packed export: its ternary layers run as plain convs with dense kernels
    variables, metadata, layers = export.read(config.restore_from)
    saved = json.loads(metadata['config'])
    for key in ('model', 'data'):
      if saved[key]['name'] != config[key]['name']:
        raise ValueError(f'restore_from={config.restore_from!r} holds {key}.name={saved[key]["name"]!r} but the '
                         f'config says {config[key]["name"]!r}: pass the config the export was made with')
    step, source, quantized = int(metadata.get('step', -1)), config.restore_from, False
    state = jax.device_put(train.TrainState.create(
        apply_fn=None, params=variables['params'], tx=optax.identity(),
        batch_stats=variables.get('batch_stats', {}), rng=jax.random.PRNGKey(0)), sharding_lib.replicated(mesh))
    report = {'sparsity': {k.removeprefix('params/'): r['sparsity'] for k, r in layers.items()},
              'scales': {k.removeprefix('params/'): (r['w_p'], r['w_n']) for k, r in layers.items()},
              'param_counts': {'ternary': sum(r['numel'] for r in layers.values()),
                               'full_precision': sum(int(np.size(x)) for x in jax.tree.leaves(variables['params']))
                               - sum(r['numel'] for r in layers.values())}}
  else:
    state = train.create_train_state(config, train.create_model(config), mesh)
    if not os.path.isdir(ckpt.checkpoint_dir(workdir)):
      raise ckpt.CheckpointError(f'workdir {workdir} has no checkpoints to evaluate (no {ckpt.checkpoint_dir(workdir)})')
    manager = ckpt.create_manager(workdir, read_only=True)
    restored = ckpt.restore_latest(manager, state, None if config.eval_step < 0 else config.eval_step)
    if restored is None:
      raise ckpt.CheckpointError(f'workdir {workdir} has no checkpoints to evaluate')
    step, state, _ = restored
    source = 'checkpoint'
    warmup = int(config.fp_warmup_epochs * train.steps_per_epoch(config))
    quantized = config.quant.method != 'fp' and step >= warmup
    report = train.quant_report(state, config)
  programs = train.Programs(config, mesh, jax.tree.map(lambda x: x.sharding, state))
  metrics = train.evaluate(programs, state, input_pipeline.eval_batches(
      config.data, global_batch_size=config.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count()), quantized)
  result = {'step': int(step), 'source': source, **metrics,
            'sparsity': report['sparsity'],
            'w_p': {k: v[0] for k, v in report['scales'].items()},
            'w_n': {k: v[1] for k, v in report['scales'].items()},
            'param_counts': report['param_counts'],
            'params_bytes_fp32': _params_bytes(jax.device_get(state.params)) + _params_bytes(jax.device_get(state.batch_stats))}
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, 'eval')
    os.makedirs(out_dir, exist_ok=True)
    name = f'step_{int(step)}.json' if source == 'checkpoint' else f'export_step_{int(step)}.json'
    path = os.path.join(out_dir, name)
    with open(path + '.tmp', 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)
    print(train.format_eval_table({**result, 'scales': report['scales']}, config))
    print(f'  wrote {path}')
  return result
