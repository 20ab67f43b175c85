"""Evaluation: the eval and BN-moments steps, evaluating a stream of batches, BN re-estimation, and
`--mode eval` (a workdir's checkpoint or a packed export, on the test split)."""

from __future__ import annotations

import json
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
from ttq_jax import input_pipeline
from ttq_jax import models
from ttq_jax import programs as programs_lib
from ttq_jax import quant as quant_lib
from ttq_jax import reports
from ttq_jax import sharding as sharding_lib
from ttq_jax import state as state_lib
from ttq_jax import steps

TOP_K = 5  # top-5 accuracy is reported for datasets with more than 5 classes


# --------------------------------------------------------------------------- per-batch maths


def cross_entropy(logits, labels, num_classes: int):
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), jax.nn.one_hot(labels, num_classes))


def topk_correct(logits, labels, k: int):
  """1.0 where the label is among the k highest logits."""
  if k == 1:
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  return (jnp.sum(logits > label_logit, axis=-1) < k).astype(jnp.float32)


def reports_top_k(num_classes: int) -> bool:
  return num_classes > TOP_K


def example_losses(logits, labels, info, loss_fn=None):
  """Per-example loss: `loss_fn(logits, labels)` when given (your own), else softmax cross-entropy."""
  return loss_fn(logits, labels) if loss_fn is not None else cross_entropy(logits, labels, info.num_classes)


def eval_step(state, batch, *, apply_fn, info, dtype, loss_fn=None):
  """Sums of loss / correct over the valid (mask = 1) rows of one global batch."""
  images = datasets.normalize(batch['image'], info, dtype)
  logits = apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, images, train=False)
  mask = batch['mask']
  out = {'loss': jnp.sum(example_losses(logits, batch['label'], info, loss_fn) * mask),
         'top1_correct': jnp.sum(topk_correct(logits, batch['label'], 1) * mask),
         'count': jnp.sum(mask)}
  if reports_top_k(info.num_classes):
    out[f'top{TOP_K}_correct'] = jnp.sum(topk_correct(logits, batch['label'], TOP_K) * mask)
  return out


def batch_moments_step(state, batch, *, apply_fn, info, dtype, loss_fn=None):
  """This batch's BN mean/var for every BN layer (train-mode forward from zero statistics)."""
  del loss_fn
  images = datasets.normalize(batch['image'], info, dtype)
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  _, updates = apply_fn({'params': state.params, 'batch_stats': zeros}, images, train=True, mutable=['batch_stats'])
  # Flax: ra = momentum * ra + (1 - momentum) * batch_value, so from ra = 0 we get the batch value back.
  return jax.tree.map(lambda x: x / (1.0 - models.BN_MOMENTUM), updates.get('batch_stats', {}))


STEPS = {'eval': programs_lib.Step(eval_step), 'moments': programs_lib.Step(batch_moments_step)}


# --------------------------------------------------------------------------- over a stream of batches


def evaluate(programs: programs_lib.Programs, state, batches, quantized: bool = True) -> dict[str, float]:
  """Loss / top-1 / top-5 over all batches (each a process-local dict with a `mask`)."""
  totals = None
  for local in batches:
    out = programs.eval(state, sharding_lib.global_batch(local, programs.mesh), quantized)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = float(totals['count'])
  result = {'loss': float(totals['loss']) / count, 'top1_accuracy': float(totals['top1_correct']) / count}
  if f'top{TOP_K}_correct' in totals:
    result[f'top{TOP_K}_accuracy'] = float(totals[f'top{TOP_K}_correct']) / count
  result['num_examples'] = int(count)
  return result


def recalibrate_batch_stats(programs: programs_lib.Programs, state, batches, quantized: bool = True):
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


def evaluate_columns(config, programs: programs_lib.Programs, state, batches_fn: Callable, recalibration_fn: Callable,
                     quantized: bool = True) -> dict[str, tuple[dict, Any]]:
  """{'running': (metrics, state)} with the training run's BN statistics and, when
  `bn_recalibration_batches` > 0, {'reestimated': (metrics, state with re-estimated statistics)}.
  `state` itself is never changed: re-estimated statistics stay out of training and its checkpoints."""
  out = {'running': (evaluate(programs, state, batches_fn(), quantized), state)}
  if config.bn_recalibration_batches > 0:
    recalibrated = recalibrate_batch_stats(programs, state, recalibration_fn(), quantized)
    out['reestimated'] = (evaluate(programs, recalibrated, batches_fn(), quantized), recalibrated)
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


def recalibration_batches(config, clean=None, user_sources: dict | None = None):
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

  The workdir's saved config decides what was trained (`config_check.workdir_config`: `config` may be None,
  and only its `EVAL_OVERRIDABLE` keys apply). From Python, `model` / `data` / `loss_fn` are your own, as
  given to `train.train_and_evaluate`."""
  config_check.check_writable(files.resolve(workdir))  # results are written there: refuse before any work
  config = config_check.workdir_config(config, files.resolve(workdir))
  config, user_sources = datasets.with_user_data(config, data, files.resolve(workdir))
  config_check.validate(config, custom_model=model is not None)
  workdir = files.resolve(workdir)
  programs_lib.setup_compilation_cache(config)
  if config.restore_from:
    mesh = sharding_lib.create_mesh(config.mesh_shape, config.mesh_axes)
    sharding_lib.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
    step, state, report, file_bn = _from_export(config, mesh)
    source, quantized = config.restore_from, False
    model = quant_lib.unquantized(model) if model is not None else None
  else:
    if not files.isdir(ckpt.checkpoint_dir(workdir)):
      raise ckpt.CheckpointError(f'workdir {workdir} has no checkpoints to evaluate (no {ckpt.checkpoint_dir(workdir)})')
    mesh, step, state, _ = state_lib.restore(config, workdir, step=None if config.eval_step < 0 else config.eval_step,
                                             model=model)
    sharding_lib.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
    source, quantized = 'checkpoint', steps.is_ternary_at(config, step)
    report = reports.quant_report(state, config, quantized=quantized)
  programs = programs_lib.Programs(config, mesh, state_lib.shardings_of(state), STEPS, model, loss_fn)
  test = lambda: eval_batches(config, datasets.get_source(config.data, 'test', user_sources))
  if config.restore_from:  # an export carries one set of BN statistics (metadata `bn_statistics`)
    columns = {file_bn: (evaluate(programs, state, test(), quantized), state)}
  else:
    columns = evaluate_columns(config, programs, state, test,
                               lambda: recalibration_batches(config, user_sources=user_sources), quantized)
  column, metrics = headline(columns)
  result = {'step': int(step), 'source': source, **metrics, 'bn_statistics': column,
            'test': {c: m for c, (m, _) in columns.items()},
            'sparsity': report['sparsity'],
            'w_p': {k: v[0] for k, v in report['scales'].items()},
            'w_n': {k: v[1] for k, v in report['scales'].items()},
            'param_counts': report['param_counts'], 'layer_rules': report.get('layer_rules', {}),
            'params_bytes_fp32': _params_bytes(state.params) + _params_bytes(state.batch_stats)}
  if jax.process_index() == 0:
    name = f'step_{int(step)}.json' if source == 'checkpoint' else f'export_step_{int(step)}.json'
    path = files.join(workdir, 'eval', name)
    files.write_json(path, result)
    model_name = type(quant_lib.unquantized(model)).__name__ if model is not None else None
    print(reports.format_eval_table({**result, 'scales': report['scales']}, config, model_name))
    print(f'  wrote {path}')
  return result
