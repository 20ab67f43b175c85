"""Training of ternary networks (TTQ, Zhu et al. ICLR 2017): the train step and the loop.

`train_step` is `(state, batch) -> (state, metrics)`, jitted once over a device mesh (batch sharded,
state donated) by `ttq_jax.programs`. `train_and_evaluate(config, workdir)` is the whole job, in four
flat sections: setup, restore (or warm start), the loop, finish. Everything it uses lives in modules
named for their concern (optim, state, checkpoint, evaluation, reports, input_pipeline, ...); nothing
imports this module but `runner`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import resource
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from ttq_jax import checkpoint as ckpt
from ttq_jax import config_check
from ttq_jax import datasets
from ttq_jax import evaluation
from ttq_jax import files
from ttq_jax import functional
from ttq_jax import input_pipeline
from ttq_jax import metric_writers
from ttq_jax import optim
from ttq_jax import programs as programs_lib
from ttq_jax import quant as quant_lib
from ttq_jax import reports
from ttq_jax import sharding as sharding_lib
from ttq_jax import state as state_lib
from ttq_jax import steps as steps_lib
from ttq_jax import tasks
from ttq_jax.errors import Interrupted, NonFiniteError


def train_step(state: state_lib.TrainState, batch, *, apply_fn, info, dtype, loss_fn=None):
  """One SGD step on the global batch; skips the update when loss/gradients are not finite."""
  task = tasks.TASKS[info.task]
  inputs, targets = task.inputs(batch, info, dtype), task.targets(batch)

  def objective(params):
    logits, updates = apply_fn({'params': params, 'batch_stats': state.batch_stats}, inputs, train=True,
                               mutable=['batch_stats'], step=state.step)
    loss = jnp.mean(task.losses(logits, targets, info, loss_fn))
    return loss, (logits, updates.get('batch_stats', {}))  # {} for models without batch norm

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  grad_norm = optax.tree_utils.tree_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  return new_state, {**task.train_metrics(loss, logits, targets, info), 'grad_norm': grad_norm, 'finite': finite}


STEPS = {'train': programs_lib.Step(train_step, updates_state=True), **evaluation.STEPS}


def create_programs(config, mesh, state, model=None, loss_fn=None) -> programs_lib.Programs:
  """The run's compiled train / eval / BN-moments programs for `state`'s shardings (`model`: your own;
  default: the config's)."""
  return programs_lib.Programs(config, mesh, state_lib.shardings_of(state), STEPS, model, loss_fn)


# --------------------------------------------------------------------------- loop helpers


class StopSignal(contextlib.AbstractContextManager):
  """When to stop for a signal, with one owner for SIGTERM.

  One process: while active, SIGTERM / SIGINT only record themselves and `stop_after(step)` turns true at
  the next step (the loop saves it and exits). Several processes: a SIGTERM may reach one host only, or
  the hosts at different steps, and a save is collective; so SIGTERM belongs to JAX's preemption service
  (started by `jax.distributed.initialize`), which tells every process the same step to stop after
  (`multihost_utils.reached_preemption_sync_point`); no handler of ours is installed. Restores the
  previous handlers on exit; outside the main thread it installs nothing.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.synced = jax.process_count() > 1
    self.signals = () if self.synced else signals
    self.signum, self._previous = None, {}

  def _record(self, signum, _frame):
    self.signum = signum

  def stop_after(self, step: int) -> bool:
    """Whether to save `step` and stop; called once per step, on every process."""
    if self.synced and multihost_utils.reached_preemption_sync_point(step):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def __enter__(self):
    for sig in self.signals:
      try:
        self._previous[sig] = signal.signal(sig, self._record)
      except ValueError:  # not the main thread
        pass
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


def is_due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def summarize_pending(pending: list, lr_fn: Callable) -> dict[str, Any]:
  """Fetches the device metrics of the pending steps (one host sync), raises NonFiniteError for a
  step whose loss or gradients were not finite, and averages them into one metrics row."""
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, fetched):
    if not bool(m['finite']):
      raise NonFiniteError(
          f'loss or gradients are not finite at step {step} (loss={float(m["train_loss"])}, '
          f'grad_norm={float(m["grad_norm"])}); the update was skipped and the last checkpoint is kept')
  row = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1] if k != 'finite'}
  row['learning_rate'] = float(lr_fn(pending[-1][0] - 1))
  return row


@dataclasses.dataclass
class _Input:
  """The run's data, opened once: the resumable training iterator, the un-augmented batches for BN
  re-estimation, the split that periodic evaluations use (validation when held out, else test) and test."""
  config: Any
  iterator: Any
  prefetcher: input_pipeline.Prefetcher
  clean: Any
  sources: dict

  @classmethod
  def create(cls, config, mesh, user_sources: dict | None = None) -> '_Input':
    stream = dict(local_batch_size=config.batch_size // jax.process_count(), seed=config.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(), user_sources=user_sources)
    ds = input_pipeline.train_dataset(config.data, **stream)
    iterator = input_pipeline.BatchIterator(ds, workers=input_pipeline.worker_count(config.data),
                                            threads=config.data.num_threads)
    own_validation = datasets.dataset_info(config.data).own_validation
    splits = ('validation', 'test') if config.data.validation_examples or own_validation else ('test',)
    return cls(config, iterator, input_pipeline.Prefetcher(iterator, mesh, config.data.prefetch_batches),
               input_pipeline.clean_train_dataset(config.data, **stream),
               {split: datasets.get_source(config.data, split, user_sources) for split in splits})

  @property
  def selection_split(self) -> str:
    """Where periodic evaluations look (and so where "best" is chosen)."""
    return 'validation' if 'validation' in self.sources else 'test'

  def recalibration_batches(self):
    return evaluation.recalibration_batches(self.config, self.clean)

  def close(self) -> None:
    self.iterator.close()

  def evaluate(self, programs, state, quantized: bool, split: str):
    batches = lambda: evaluation.eval_batches(self.config, self.sources[split], split)
    return evaluation.evaluate_columns(self.config, programs, state, batches, self.recalibration_batches, quantized)


@dataclasses.dataclass
class _BestOnValidation:
  """Per BN column, a host copy of the model with the best validation metric (the task's: top-1, bits per
  byte) among the counted evaluations of this process (ternary ones once the model is ternary), for its test
  number at the end."""
  task: tasks.Task
  best: dict = dataclasses.field(default_factory=dict)  # column -> (metric, step, params, batch_stats)

  def update(self, columns: dict, step: int) -> None:
    for column, (metrics, state) in columns.items():
      if column not in self.best or self.task.better(metrics[self.task.metric], self.best[column][0]):
        self.best[column] = (metrics[self.task.metric], step, *jax.device_get((state.params, state.batch_stats)))



INIT_FROM_RECORD = 'init_from.json'  # WORKDIR/init_from.json: what the warm start loaded (checkpoint.load_init_from)


def _restore_or_warm_start(config, workdir: str, manager, state, inputs: _Input):
  """(first step to run, state): the newest readable checkpoint of `workdir` with its iterator state,
  else `init_from`'s weights (fine-tuning; what was loaded is recorded in WORKDIR/init_from.json), else
  the fresh state."""
  restored = state_lib.restore_latest(manager, state)
  if restored is None:
    if not config.init_from:
      return 0, state
    state, record = ckpt.load_init_from(state, config.init_from)
    if jax.process_index() == 0:
      files.write_json(files.join(workdir, INIT_FROM_RECORD), record)
    return 0, state
  step, state, data_state = restored
  ckpt.quarantine_newer(manager, workdir, step)
  inputs.iterator.set_state(data_state or {'next_index': step})
  logging.info('resumed from step %d in %s', step, workdir)
  return step, state


def _switch_to_ternary(state, config, step: int):
  """Sets the scales (and optionally normalises kernels) at the start of ternary training."""
  params = state_lib.start_ternary(state.params, config, state.ternary)
  logging.info('step %d: %s, training ternary from here (scales: %s)', step,
               'full-precision warm-up done' if step else 'no full-precision warm-up',
               config.quant.scale_init or "each method's own")
  return state.replace(params=jax.device_put(params, state_lib.shardings_of(state.params)))


def _log_start(config, state, mesh) -> None:
  counts = quant_lib.count_params(state.params, state.ternary)
  logging.info('model %s on %s: %d ternary + %d full-precision parameters; %d steps (%d per epoch), mesh %s',
               config.model.name, config.data.name, counts['ternary'], counts['full_precision'],
               steps_lib.total_steps(config), steps_lib.steps_per_epoch(config), dict(mesh.shape))


def _run_eval(config, programs, state, inputs: _Input, quantized: bool):
  """(eval columns of the selection split, their metrics-row entries); `state` is not changed."""
  t0 = time.perf_counter()
  columns = inputs.evaluate(programs, state, quantized, inputs.selection_split)
  row = {'eval_seconds': time.perf_counter() - t0, 'eval_ternary': float(quantized and steps_lib.is_quantized(config))}
  for column, (metrics, _) in columns.items():
    row.update({f'{reports.BN_COLUMNS[column]}{k}': v for k, v in metrics.items()})
  return columns, row


def _final_test(config, programs, state, inputs: _Input, quantized: bool, best: _BestOnValidation) -> dict:
  """Test metrics of the final model (both BN columns) and, with a validation split, of the models
  chosen on validation (the test set is looked at only here)."""
  columns = inputs.evaluate(programs, state, quantized, 'test')
  column, metrics = evaluation.headline(columns)
  out = {**metrics, 'bn_statistics': column, 'test': {c: m for c, (m, _) in columns.items()}}
  if best.best:
    out['best_on_validation'] = {}
    for c, (value, step, params, batch_stats) in best.best.items():
      chosen = state.replace(params=jax.device_put(params, state_lib.shardings_of(state.params)),
                             batch_stats=jax.device_put(batch_stats, state_lib.shardings_of(state.batch_stats)))
      test_batches = evaluation.eval_batches(config, inputs.sources['test'], 'test')
      test = evaluation.evaluate(programs, chosen, test_batches, quantized)
      out['best_on_validation'][c] = {'step': step, f'validation_{best.task.metric}': value, **test}
  return out


def _target_reached(config, metrics: dict, step: int, started: float) -> dict:
  """{'step', 'seconds'} when this eval reaches `config.target_accuracy` (0 = off), else {}."""
  if 0 < config.target_accuracy <= metrics['top1_accuracy']:
    return {'step': step, 'seconds': time.perf_counter() - started}
  return {}


def _progress_scalars(config, progress, state, step: int, dynamics: reports.CodeDynamics) -> dict[str, Any]:
  rate = progress.rate(step)
  return {'steps_per_second': rate, 'images_per_second': rate * config.batch_size,
          'host_peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          **reports.flat_quant_scalars(reports.quant_report(state, config)),
          **dynamics.scalars(state.params, state.ternary)}


# --------------------------------------------------------------------------- the job


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, model=None, data=None,
                       loss_fn: Callable | None = None) -> dict[str, Any]:
  """Trains (resuming from the newest readable checkpoint in `workdir`) and evaluates on the test split.

  Bring your own (Python callers; the CLI builds everything from the config): `model`, any Flax model
  (e.g. `quant.quantize(my_model, rules)`; called as `model.apply(variables, images, train=...)`, without
  `train` when its `__call__` has no such argument); `data`,
  a dict of `datasets.user_data` arguments (train / test sources or arrays, ...); `loss_fn`,
  `(logits, labels) -> per-example loss`. Checkpoints, resume, logging, eval and export work the same.
  Returns the final eval metrics with the quantization report.
  """
  # Setup: every check that can refuse runs before anything is compiled or written.
  model = functional.as_functional(model)  # an NNX module as init / apply; refuses what no step can call
  config, user_sources = datasets.with_user_data(config, data)
  config_check.validate(config, custom_model=model is not None)
  config_check.check_warm_start(config)
  started = time.perf_counter()
  workdir = files.resolve(workdir)
  config_check.prepare_workdir(config, workdir, write=False)
  programs_lib.setup_compilation_cache(config)
  mesh = sharding_lib.create_mesh(config.mesh_shape, config.mesh_axes)
  sharding_lib.check_batch_size(config.batch_size, mesh)
  sharding_lib.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
  inputs = _Input.create(config, mesh, user_sources)  # a missing dataset fails here
  state = state_lib.create_train_state(config, model or state_lib.create_model(config), mesh)
  primary = jax.process_index() == 0
  if model is not None and primary and (mismatch := reports.rules_differ_from_config(state.ternary, config)):
    logging.warning('%s', mismatch)
  config_check.write_config(config, workdir)
  programs = create_programs(config, mesh, state, model, loss_fn)
  manager = ckpt.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  total, ternary_start = steps_lib.total_steps(config), steps_lib.ternary_start_step(config)
  if primary and steps_lib.is_quantized(config) and total <= ternary_start:
    logging.warning('this run ends at step %d, inside its full-precision warm-up (ternary training starts after step '
                    '%d): it trains no ternary step (shorten fp_warmup_steps / fp_warmup_epochs or train longer)',
                    total, ternary_start)

  # Restore.
  start_step, state = _restore_or_warm_start(config, workdir, manager, state, inputs)
  if primary and start_step == 0:
    _log_start(config, state, mesh)
  writer = metric_writers.MetricWriter(workdir, enabled=primary, resume_step=start_step)
  progress = metric_writers.Progress(total, config.batch_size, start_step, enabled=primary)
  lr_fn = optim.create_learning_rate_fn(config)

  # Loop: one train step, then one-line checks of what is due after it.
  task = tasks.of(config)
  pending, target, best, last = [], {}, _BestOnValidation(task), (None, None)  # last: (step, eval columns)
  dynamics = reports.CodeDynamics()  # flip rates between this process's logged steps
  with StopSignal() as stop, contextlib.ExitStack() as cleanup:
    cleanup.callback(writer.close)
    cleanup.callback(inputs.close)  # stops the input workers (after the step's checkpoint is saved)
    cleanup.callback(manager.close)
    cleanup.callback(manager.wait_until_finished)
    for step in range(start_step + 1, total + 1):
      quantized = step > ternary_start
      if step == ternary_start + 1 and steps_lib.is_quantized(config):  # also from scratch: quant.scale_init
        state = _switch_to_ternary(state, config, step - 1)
      batch, data_state = inputs.prefetcher.next()
      state, metrics = programs.train(state, batch, quantized)
      pending.append((step, metrics))
      do_eval = step == total or is_due(step, config.eval_every_steps)
      stopping = stop.stop_after(step)
      do_save = step == total or is_due(step, config.checkpoint_every_steps) or stopping
      do_log = is_due(step, config.log_every_steps) or do_eval
      if do_log or do_save:  # finiteness is checked before every save
        row, pending = summarize_pending(pending, lr_fn), []
      if do_log:
        row.update(_progress_scalars(config, progress, state, step, dynamics))
      if do_eval:
        columns, eval_row = _run_eval(config, programs, state, inputs, quantized)
        last = (step, columns)
        if quantized:  # "best" and the time to target count only evaluations of the trained (ternary) model
          target = target or _target_reached(config, evaluation.headline(columns)[1], step, started)
          if inputs.selection_split == 'validation':
            best.update(columns, step)
        row.update(eval_row, **({'time_to_target_s': target['seconds']} if target.get('step') == step else {}))
      if do_log:
        row['elapsed_s'] = time.perf_counter() - started
        writer.write(step, row)
        progress.print(step, row)
      if do_save:
        ckpt.save(manager, step, state, data_state, force=True)
        writer.flush()  # a bucket's metrics.jsonl is uploaded with every checkpoint
      if stopping:
        logging.warning('signal %d: saved checkpoint at step %d, exiting', stop.signum, step)
        manager.wait_until_finished()
        raise SystemExit(128 + stop.signum)

  # Finish: the test split (once, if periodic evaluations looked at validation), then the protocol.
  step = max(start_step, total)
  if inputs.selection_split == 'test' and last[0] == step:
    column, metrics = evaluation.headline(last[1])
    final = {**metrics, 'bn_statistics': column, 'test': {c: m for c, (m, _) in last[1].items()}}
  else:
    try:
      final = _final_test(config, programs, state, inputs, step > ternary_start, best)
    except KeyboardInterrupt:
      raise Interrupted(f'interrupted during the final test evaluation; the checkpoint of step {step} is saved in '
                        f'{workdir}: `--mode eval` evaluates it') from None
  trained_ternary = steps_lib.ternary_steps(config, step)
  result = {'step': step, 'ternary_steps': trained_ternary, **final, 'selection_split': inputs.selection_split,
            **reports.quant_report(state, config, quantized=trained_ternary > 0),
            **evaluation.run_record(config, programs, state, step > ternary_start), 'elapsed_s': time.perf_counter() - started}
  if primary:
    result['protocol'] = reports.eval_protocol(reports.read_metrics(files.join(workdir, 'metrics.jsonl')),
                                               metric=task.metric, higher_is_better=task.higher_is_better)
  if config.target_accuracy > 0:
    result['target'] = {'accuracy': config.target_accuracy, **target}
  if primary and files.exists(files.join(workdir, INIT_FROM_RECORD)):
    result['init_from'] = json.loads(files.read_text(files.join(workdir, INIT_FROM_RECORD)))
  if primary:
    files.write_json(files.join(workdir, 'result.json'), result)
    print(reports.format_eval_table(result, config, functional.model_name(model)))
  return result
