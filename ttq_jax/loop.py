"""The parts of the training loop (`train.train_and_evaluate`): when to stop for a signal, the run's input, what
the loop has seen (pending metrics, evaluations, the model chosen on validation, the target), restore or warm start,
the switch to ternary, the evaluations and the final test."""

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
import numpy as np
from jax.experimental import multihost_utils

from ttq_jax import checkpoint as ckpt
from ttq_jax import datasets
from ttq_jax import evaluation
from ttq_jax import files
from ttq_jax import input_pipeline
from ttq_jax import quant as quant_lib
from ttq_jax import reports
from ttq_jax import sharding as sharding_lib
from ttq_jax import state as state_lib
from ttq_jax import steps as steps_lib
from ttq_jax import tasks
from ttq_jax import workdirs
from ttq_jax.errors import Interrupted, NonFiniteError


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
class Input:
  """The run's data, opened once: the resumable training iterator, the un-augmented batches for BN
  re-estimation, the split that periodic evaluations use (validation when held out, else test) and test."""
  config: Any
  iterator: Any
  prefetcher: sharding_lib.Prefetcher
  clean: Any
  sources: dict

  @classmethod
  def create(cls, config, mesh, user_sources: dict | None = None) -> 'Input':
    stream = dict(local_batch_size=config.batch_size // jax.process_count(), seed=config.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(), user_sources=user_sources)
    ds = input_pipeline.train_dataset(config.data, **stream)
    iterator = input_pipeline.BatchIterator(ds, workers=input_pipeline.worker_count(config.data),
                                            threads=config.data.num_threads)
    own_validation = datasets.dataset_info(config.data).own_validation
    splits = ('validation', 'test') if config.data.validation_examples or own_validation else ('test',)
    return cls(config, iterator, sharding_lib.Prefetcher(iterator, mesh, config.data.prefetch_batches),
               input_pipeline.clean_train_dataset(config.data, **stream),
               {split: datasets.get_source(config.data, split, user_sources) for split in splits})

  @property
  def selection_split(self) -> str:
    """Where periodic evaluations look (and so where "best" is chosen)."""
    return 'validation' if 'validation' in self.sources else 'test'

  def reestimation_batches(self):
    return evaluation.reestimation_batches(self.config, self.clean)

  def close(self) -> None:
    self.iterator.close()

  def evaluate(self, programs, state, quantized: bool, split: str):
    batches = lambda: evaluation.eval_batches(self.config, self.sources[split], split)
    return evaluation.evaluate_columns(self.config, programs, state, batches, self.reestimation_batches, quantized)


@dataclasses.dataclass
class BestOnValidation:
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


def warm_start(config, workdir: str, state):
  """(state, record): `init_from`'s weights in `state` when the run starts from it (`init_from` set and no
  checkpoint in `workdir` yet), read before anything is written (a bad `init_from` leaves no file behind);
  else (state, None)."""
  if not config.init_from or workdirs.has_checkpoints(workdir):
    return state, None
  return ckpt.load_init_from(state, config.init_from)


def restore_or_warm_start(config, workdir: str, manager, state, inputs: Input, warm: dict | None = None):
  """(first step to run, state): the newest readable checkpoint of `workdir` with its iterator state,
  else `init_from`'s weights (fine-tuning; `warm`: the record of `warm_start`, which loaded them already; what was
  loaded is recorded in WORKDIR/init_from.json), else the fresh state."""
  restored = state_lib.restore_latest(manager, state)
  if restored is None:
    if not config.init_from:
      return 0, state
    state, record = (state, warm) if warm else ckpt.load_init_from(state, config.init_from)
    if jax.process_index() == 0:
      files.write_json(files.join(workdir, INIT_FROM_RECORD), record)
    return 0, state
  step, state, data_state = restored
  ckpt.quarantine_newer(manager, workdir, step)
  inputs.iterator.set_state(data_state or {'next_index': step})
  logging.info('resumed from step %d in %s', step, workdir)
  return step, state


def switch_to_ternary(state, config, step: int):
  """Sets the scales (and optionally normalises kernels) at the start of ternary training."""
  params = state_lib.start_ternary(state.params, config, state.ternary)
  logging.info('step %d: %s, training ternary from here (scales: %s)', step,
               'full-precision warm-up done' if step else 'no full-precision warm-up',
               config.quant.scale_init or "each method's own")
  return state.replace(params=jax.device_put(params, state_lib.shardings_of(state.params)))


def log_start(config, state, mesh) -> None:
  counts = quant_lib.count_params(state.params, state.ternary)
  logging.info('model %s on %s: %d ternary + %d full-precision parameters; %d steps (%d per epoch), mesh %s',
               config.model.name, config.data.name, counts['ternary'], counts['full_precision'],
               steps_lib.total_steps(config), steps_lib.steps_per_epoch(config), dict(mesh.shape))


def log_data(config) -> None:
  """Which folder (and corpus) the run reads: a folder named by the environment is never silently replaced."""
  logging.info('data %s from %s', config.data.name, datasets.data_location(config.data))


def run_eval(config, programs, state, inputs: Input, quantized: bool):
  """(eval columns of the selection split, their metrics-row entries); `state` is not changed."""
  t0 = time.perf_counter()
  columns = inputs.evaluate(programs, state, quantized, inputs.selection_split)
  row = {'eval_seconds': time.perf_counter() - t0, 'eval_ternary': float(quantized and steps_lib.is_quantized(config))}
  for column, (metrics, _) in columns.items():
    row.update({f'{reports.BN_COLUMNS[column]}{k}': v for k, v in metrics.items()})
  return columns, row


def final_test(config, programs, state, inputs: Input, quantized: bool, best: BestOnValidation,
               final_step: int) -> dict:
  """Test metrics of the final model (both BN columns) and, with a validation split, of the models
  chosen on validation (the test set is looked at only here; a model chosen at the final step is the final
  model, evaluated once)."""
  columns = inputs.evaluate(programs, state, quantized, 'test')
  column, metrics = evaluation.headline(columns)
  out = {**metrics, 'bn_statistics': column, 'test': {c: m for c, (m, _) in columns.items()}}
  if best.best:
    out['best_on_validation'] = {}
    for c, (value, step, params, batch_stats) in best.best.items():
      if step == final_step:  # the final model itself (its re-estimated statistics are recomputed from the same batches)
        test = out['test'][c]
      else:
        chosen = state.replace(params=jax.device_put(params, state_lib.shardings_of(state.params)),
                               batch_stats=jax.device_put(batch_stats, state_lib.shardings_of(state.batch_stats)))
        test = evaluation.evaluate(programs, chosen, evaluation.eval_batches(config, inputs.sources['test'], 'test'),
                                   quantized)
      out['best_on_validation'][c] = {'step': step, f'validation_{best.task.metric}': value, **test}
  return out


def target_reached(config, task: tasks.Task, metrics: dict, step: int, started: float) -> dict:
  """{'step', 'seconds'} when this eval reaches `config.target_accuracy` (0 = off) in the task's target metric."""
  if 0 < config.target_accuracy <= metrics[task.target_metric]:
    return {'step': step, 'seconds': time.perf_counter() - started}
  return {}


def progress_scalars(config, rate: float, info, state, dynamics: reports.CodeDynamics) -> dict[str, Any]:
  """The logged step's rate (steps/s of the last window and the task's throughput), memory, scales, dynamics."""
  return {**tasks.TASKS[info.task].throughput_scalars(rate, config.batch_size, info),
          'host_peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          **reports.flat_quant_scalars(reports.quant_report(state, config)),
          **dynamics.scalars(state.params, state.ternary)}


@dataclasses.dataclass
class Seen:
  """The loop's one record of what it has seen: metrics of the steps since the last log (`pending`), the last
  evaluation (`last`: step, columns), the model chosen on validation (`best`) and when the target was reached."""
  task: tasks.Task
  lr_fn: Callable
  started: float
  pending: list = dataclasses.field(default_factory=list)
  last: tuple = (None, None)
  target: dict = dataclasses.field(default_factory=dict)
  best: BestOnValidation = None
  dynamics: reports.CodeDynamics = dataclasses.field(default_factory=reports.CodeDynamics)
  seconds: dict = dataclasses.field(default_factory=lambda: {'compile': 0.0, 'eval': 0.0, 'save': 0.0})

  def exclude(self, progress, kind: str, seconds: float) -> None:
    """`seconds` of non-training work (`kind`: compile, eval, save): out of the progress window, into the totals."""
    self.seconds[kind] += seconds
    progress.exclude(seconds)

  def __post_init__(self):
    self.best = self.best or BestOnValidation(self.task)


def report_step(config, step: int, total: int, state, programs, inputs: Input, seen: Seen, progress,
                quantized: bool, do_save: bool) -> dict | None:
  """After a train step: the metrics row to log for this step, with an evaluation when one is due; None when
  this step is not logged. Pending metrics are fetched (and checked finite) for every log and every save."""
  do_eval = step == total or is_due(step, config.eval_every_steps)
  do_log = is_due(step, config.log_every_steps) or do_eval
  if not (do_log or do_save):
    return None
  row, seen.pending = summarize_pending(seen.pending, seen.lr_fn), []
  compiled = sum(programs.compile_seconds.get(('train', q), 0.0) for q in (True, False))
  seen.exclude(progress, 'compile', compiled - seen.seconds['compile'])  # the train step's compilations so far
  if do_log:
    row.update(progress_scalars(config, progress.window_rate(step), programs.info, state, seen.dynamics))
  if do_eval:
    columns, eval_row = run_eval(config, programs, state, inputs, quantized)
    seen.exclude(progress, 'eval', eval_row['eval_seconds'])
    seen.last = (step, columns)
    if quantized:  # "best" and the time to target count only evaluations of the trained (ternary) model
      seen.target = seen.target or target_reached(config, seen.task, evaluation.headline(columns)[1], step,
                                                  seen.started)
      if inputs.selection_split == 'validation':
        seen.best.update(columns, step)
    row.update(eval_row, **({'time_to_target_s': seen.target['seconds']} if seen.target.get('step') == step else {}))
  if do_log:
    row['elapsed_s'] = time.perf_counter() - seen.started
  return row if do_log else None


def finish(config, workdir: str, programs, state, inputs: Input, seen: Seen, step: int) -> dict[str, Any]:
  """The result of a run that trained to `step`: the test split (once: the last evaluation when it already looked
  at test at this step), the quantization report, the run record, the eval protocol and the target."""
  ternary_start = steps_lib.ternary_start_step(config)
  if inputs.selection_split == 'test' and seen.last[0] == step:
    column, metrics = evaluation.headline(seen.last[1])
    final = {**metrics, 'bn_statistics': column, 'test': {c: m for c, (m, _) in seen.last[1].items()}}
  else:
    try:
      final = final_test(config, programs, state, inputs, step > ternary_start, seen.best, step)
    except KeyboardInterrupt:
      raise Interrupted(f'interrupted during the final test evaluation; the checkpoint of step {step} is saved in '
                        f'{workdir}: `--mode eval` evaluates it') from None
  trained_ternary = steps_lib.ternary_steps(config, step)
  result = {'step': step, 'ternary_steps': trained_ternary, **final, 'selection_split': inputs.selection_split,
            **reports.quant_report(state, config, quantized=trained_ternary > 0),
            **evaluation.run_record(config, programs, state, step > ternary_start),
            'elapsed_s': time.perf_counter() - seen.started,
            'seconds': {'compile_train_step': seen.seconds['compile'], 'evaluation': seen.seconds['eval'],
                        'checkpoint_saves': seen.seconds['save']}}
  if not jax.tree.leaves(state.batch_stats):  # no batch norm: no BN statistics to name
    result.pop('bn_statistics', None)
  if jax.process_index() == 0:
    result['protocol'] = reports.eval_protocol(reports.read_metrics(files.join(workdir, 'metrics.jsonl')),
                                               metric=seen.task.metric, higher_is_better=seen.task.higher_is_better)
  if config.target_accuracy > 0:
    result['target'] = {'accuracy': config.target_accuracy, **seen.target}
  if jax.process_index() == 0 and files.exists(files.join(workdir, INIT_FROM_RECORD)):
    result['init_from'] = json.loads(files.read_text(files.join(workdir, INIT_FROM_RECORD)))
  return result


def warn_without_ternary_steps(config) -> None:
  total, ternary_start = steps_lib.total_steps(config), steps_lib.ternary_start_step(config)
  if steps_lib.is_quantized(config) and total <= ternary_start:
    logging.warning('this run ends at step %d, inside its full-precision warm-up (ternary training starts after step '
                    '%d): it trains no ternary step (shorten fp_warmup_steps / fp_warmup_epochs or train longer)',
                    total, ternary_start)
