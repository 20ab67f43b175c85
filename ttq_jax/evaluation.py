"""Evaluation: the eval and BN-moments steps, evaluating a stream of batches, BN re-estimation, and
`--mode eval` (a workdir's checkpoint or a packed export, on the test split)."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ttq_jax import checkpoint as ckpt
from ttq_jax import config_check
from ttq_jax import datasets
from ttq_jax import export_format
from ttq_jax import files
from ttq_jax import functional
from ttq_jax import input_pipeline
from ttq_jax import models
from ttq_jax import programs as programs_lib
from ttq_jax import run as run_lib
from ttq_jax import reports
from ttq_jax import sharding as sharding_lib
from ttq_jax import state as state_lib
from ttq_jax import steps
from ttq_jax import tasks

# --------------------------------------------------------------------------- per-batch steps (the maths: `tasks`)


def eval_step(state, batch, *, apply_fn, info, dtype, loss_fn=None):
  """The task's sums (loss, correct, count) over the counted (mask = 1) examples or bytes of one global batch."""
  task = tasks.TASKS[info.task]
  logits = apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, task.inputs(batch, info, dtype),
                    train=False)
  return task.eval_sums(logits, task.targets(batch), batch['mask'], info, loss_fn)


def batch_moments_step(state, batch, *, apply_fn, info, dtype, loss_fn=None):
  """This batch's BN mean/var for every BN layer (train-mode forward from zero statistics)."""
  del loss_fn
  inputs = tasks.TASKS[info.task].inputs(batch, info, dtype)
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  _, updates = apply_fn({'params': state.params, 'batch_stats': zeros}, inputs, train=True, mutable=['batch_stats'])
  # Flax: ra = momentum * ra + (1 - momentum) * batch_value, so from ra = 0 we get the batch value back.
  return jax.tree.map(lambda x: x / (1.0 - models.BN_MOMENTUM), updates.get('batch_stats', {}))


STEPS = {'eval': programs_lib.Step(eval_step), 'moments': programs_lib.Step(batch_moments_step)}


# --------------------------------------------------------------------------- over a stream of batches


def evaluate(programs: programs_lib.Programs, state, batches, quantized: bool = True) -> dict[str, float]:
  """The task's metrics (loss, top-1, top-5 or bits per byte) over all batches (each a process-local dict
  with a `mask`)."""
  totals = None
  for local in batches:
    out = programs.eval(state, sharding_lib.global_batch(local, programs.mesh), quantized)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  return tasks.TASKS[programs.info.task].metrics(jax.device_get(totals))


def reestimate_batch_stats(programs: programs_lib.Programs, state, batches, quantized: bool = True):
  """Replaces BN running statistics by the average batch statistics of the current (ternary)
  weights over clean training batches (the running averages lag the final ternary weights)."""
  total, n = None, 0
  for local in batches:
    moments = programs.moments(state, sharding_lib.global_batch(local, programs.mesh), quantized)
    total = moments if total is None else jax.tree.map(jnp.add, total, moments)
    n += 1
  if n == 0:
    return state
  return state.replace(batch_stats=jax.tree.map(lambda x: x / n, total))


def evaluate_columns(config, programs: programs_lib.Programs, state, batches_fn: Callable, reestimation_fn: Callable,
                     quantized: bool = True) -> dict[str, tuple[dict, Any]]:
  """{'running': (metrics, state)} with the training run's BN statistics and, when
  `bn_recalibration_batches` > 0, {'reestimated': (metrics, state with re-estimated statistics)}.
  `state` itself is never changed: re-estimated statistics stay out of training and its checkpoints."""
  out = {'running': (evaluate(programs, state, batches_fn(), quantized), state)}
  if config.bn_recalibration_batches > 0:
    reestimated = reestimate_batch_stats(programs, state, reestimation_fn(), quantized)
    out['reestimated'] = (evaluate(programs, reestimated, batches_fn(), quantized), reestimated)
  return out


def headline(columns: dict[str, tuple[dict, Any]]) -> tuple[str, dict]:
  """(column, metrics) a run reports first: re-estimated statistics when computed, else running."""
  column = 'reestimated' if 'reestimated' in columns else 'running'
  return column, columns[column][0]


def eval_batches(config, source=None, split: str = 'test'):
  """This process's part of every global batch of `split` (`source`: the split, if already open), made by
  the input workers (`data.worker_processes`)."""
  return input_pipeline.eval_batches(config.data, split=split, global_batch_size=config.eval_batch_size,
                                     process_index=jax.process_index(), process_count=jax.process_count(),
                                     source=source, workers=input_pipeline.worker_count(config.data),
                                     threads=config.data.num_threads)


def reestimation_batches(config, clean=None, user_sources: dict | None = None):
  """The clean training batches a training run re-estimates BN statistics on (same seed, same order);
  `clean`: the run's `input_pipeline.clean_train_dataset`, if already open; `user_sources`: your own data's."""
  if clean is None:
    clean = input_pipeline.clean_train_dataset(
        config.data, local_batch_size=config.batch_size // jax.process_count(), seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), user_sources=user_sources)
  with input_pipeline.BatchIterator(clean[:config.bn_recalibration_batches], threads=config.data.num_threads,
                                    workers=input_pipeline.worker_count(config.data)) as it:
    yield from it


# --------------------------------------------------------------------------- --mode eval


def run_record(config, programs: programs_lib.Programs, state, quantized: bool) -> dict[str, Any]:
  """What a result records beyond metrics, as the task says (`tasks.Task.record`; for text: the corpus digest
  and samples of the model continuing fixed prompts)."""
  return tasks.TASKS[programs.info.task].record(config, state_lib.apply_fn(programs.models[quantized]),
                                                {'params': state.params, 'batch_stats': state.batch_stats},
                                                programs.info)


def _params_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _check_export_matches(config, metadata: dict) -> None:
  saved = json.loads(metadata['config'])
  for key in ('model', 'data'):
    if saved[key]['name'] != config[key]['name']:
      raise config_check.ConfigError(
          f'restore_from={config.restore_from!r} holds {key}.name={saved[key]["name"]!r} but the config says '
          f'{config[key]["name"]!r}: pass the config the export was made with')


def _from_export(config, mesh):
  """(step, state, report) of a packed export: ternary layers run as plain convs with dense kernels."""
  variables, metadata, layers = export_format.read(config.restore_from)
  _check_export_matches(config, metadata)
  state = jax.device_put(state_lib.TrainState.create(
      apply_fn=None, params=variables['params'], tx=optax.identity(), batch_stats=variables.get('batch_stats', {})),
      sharding_lib.replicated(mesh))
  ternary = sum(r['numel'] for r in layers.values())
  report = {**reports.from_layer_reports(layers),
            'param_counts': {'ternary': ternary,
                             'full_precision': sum(int(np.size(x)) for x in jax.tree.leaves(variables['params'])) - ternary}}
  return int(metadata.get('step', -1)), state, report, metadata['bn_statistics']


def evaluate_workdir(config, workdir: str, *, model=None, data=None, loss_fn=None) -> dict[str, Any]:
  """`--mode eval`: evaluates the newest (or `eval_step`) checkpoint of `workdir`, or the export named by
  `restore_from`, on the test split; writes WORKDIR/eval/step_<N>.json (export_step_<N>.json).

  The workdir's saved config decides what was trained (`workdirs.workdir_config`: `config` may be None,
  and only its `EVAL_OVERRIDABLE` keys apply). From Python, `model` / `data` / `loss_fn` are your own, as
  given to `train.train_and_evaluate`."""
  run = run_lib.for_workdir(config, workdir, model=model, data=data, loss_fn=loss_fn, writes=False)  # eval_dir
  config, workdir, model, user_sources = run.config, run.workdir, run.model, run.user_sources
  if config.restore_from:
    step, state, report, file_bn = _from_export(config, run.mesh)
    source, quantized = config.restore_from, False
    model = functional.plain(model) if model is not None else None
  else:
    if not files.isdir(ckpt.checkpoint_dir(workdir)):
      raise ckpt.CheckpointError(f'workdir {workdir} has no checkpoints to evaluate (no {ckpt.checkpoint_dir(workdir)})')
    step, state, _ = run.restore(None if config.eval_step < 0 else config.eval_step)
    source, quantized = 'checkpoint', steps.is_ternary_at(config, step)
    report = reports.quant_report(state, config, quantized=quantized)
  programs = run.programs(state, STEPS, model)
  test = lambda: eval_batches(config, datasets.get_source(config.data, 'test', user_sources))
  if config.restore_from:  # an export carries one set of BN statistics (metadata `bn_statistics`)
    columns = {file_bn: (evaluate(programs, state, test(), quantized), state)}
  else:
    columns = evaluate_columns(config, programs, state, test,
                               lambda: reestimation_batches(config, user_sources=user_sources), quantized)
  column, metrics = headline(columns)
  result = {'step': int(step), 'source': source, **metrics, 'bn_statistics': column,
            'test': {c: m for c, (m, _) in columns.items()},
            'sparsity': report['sparsity'],
            'w_p': {k: v[0] for k, v in report['scales'].items()},
            'w_n': {k: v[1] for k, v in report['scales'].items()},
            'param_counts': report['param_counts'], 'layer_rules': report.get('layer_rules', {}),
            'params_bytes_fp32': _params_bytes(state.params) + _params_bytes(state.batch_stats),
            **run_record(config, programs, state, quantized)}
  if not jax.tree.leaves(state.batch_stats):  # no batch norm: no BN statistics to name
    result.pop('bn_statistics')
  if jax.process_index() == 0:
    name = f'step_{int(step)}.json' if source == 'checkpoint' else f'export_step_{int(step)}.json'
    print(reports.format_eval_table({**result, 'scales': report['scales']}, config, functional.model_name(model)))
    _write_result(files.join(config.eval_dir or files.join(workdir, 'eval'), name), result)
  return result


def _write_result(path: str, result: dict) -> None:
  """`result` as JSON at `path` (`eval_dir`); where that cannot be written (a read-only workdir, say), on stdout
  with one warning."""
  try:
    files.write_json(path, result)
  except OSError as e:
    logging.warning('eval_dir: %s is not writable (%s): the result goes to stdout (set --config.eval_dir to keep it)',
                    path, e.strerror or type(e).__name__)
    print(json.dumps(result, sort_keys=True))
    return
  print(f'  wrote {path}')
