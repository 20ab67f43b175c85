"""Training of ternary networks (TTQ, Zhu et al. ICLR 2017): the train step and the loop.

`train_step` is `(state, batch) -> (state, metrics)`, jitted once over a device mesh (batch sharded,
state donated) by `ttq_jax.programs`. `train_and_evaluate(config, workdir)` is the whole job, in four
flat sections: setup (`run.for_training`: the one place a run is built), restore (or warm start), the loop,
finish (its parts: `loop`). Everything it uses lives in modules named for their concern (run, loop, optim,
state, checkpoint, evaluation, reports, ...); nothing imports this module but `runner`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ttq_jax import checkpoint as ckpt
from ttq_jax import evaluation
from ttq_jax import files
from ttq_jax import functional
from ttq_jax import lease as lease_lib
from ttq_jax import loop
from ttq_jax import metric_writers
from ttq_jax import optim
from ttq_jax import programs as programs_lib
from ttq_jax import reports
from ttq_jax import run as run_lib
from ttq_jax import state as state_lib
from ttq_jax import steps as steps_lib
from ttq_jax import tasks
from ttq_jax import workdirs
from ttq_jax.errors import ConfigError


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


# --------------------------------------------------------------------------- the job


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, model=None, data=None,
                       loss_fn: Callable | None = None) -> dict[str, Any]:
  """Trains (resuming from the newest readable checkpoint in `workdir`) and evaluates on the test split.

  Bring your own (Python callers; the CLI builds everything from the config): `model`, any Flax model, Linen
  or NNX (e.g. `quant.quantize(my_model, rules)`; a Linen model is called as `model.apply(variables, images,
  train=...)`, without `train` when its `__call__` has no such argument; an NNX model as `model(images)` after
  `model.train()` / `model.eval()`, `ttq_jax.functional`); `data`, a dict of `datasets.user_data` arguments
  (train / test sources or arrays, ...); `loss_fn`, `(logits, labels) -> per-example loss`. Checkpoints,
  resume, logging, eval and export work the same. Returns the final eval metrics with the quantization report.
  """
  # Setup: every check that can refuse runs before anything is compiled or written.
  started = time.perf_counter()
  run = run_lib.for_training(config, workdir, model=model, data=data, loss_fn=loss_fn)
  config, workdir, primary = run.config, run.workdir, jax.process_index() == 0
  inputs = loop.Input.create(config, run.mesh, run.user_sources)  # a missing dataset fails here
  state, warm = loop.warm_start(config, workdir, run.fresh_state())  # a bad init_from fails here
  if run.custom_model and primary and (mismatch := reports.rules_differ_from_config(state.ternary, config)):
    logging.warning('%s', mismatch)
  try:  # one writer per workdir, from here to the end (process 0 holds it for all processes)
    held = lease_lib.Lease.for_config(workdir, config).acquire() if primary else None
  except ConfigError:
    inputs.close()
    raise
  try:
    return _train(run, inputs, state, warm, started, held)
  finally:
    if held is not None:
      held.release()


def _train(run: run_lib.Run, inputs: loop.Input, state, warm: dict | None, started: float,
           held: lease_lib.Lease | None) -> dict[str, Any]:
  """The run of `train_and_evaluate` once every start check has passed and the workdir is leased."""
  config, workdir, primary = run.config, run.workdir, jax.process_index() == 0
  workdirs.write_config(config, workdir)
  programs = run.programs(state, STEPS)
  manager = ckpt.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  total, ternary_start = steps_lib.total_steps(config), steps_lib.ternary_start_step(config)
  if primary:
    loop.log_data(config)
    loop.warn_without_ternary_steps(config)

  # Restore.
  start_step, state = loop.restore_or_warm_start(config, workdir, manager, state, inputs, warm)
  if primary and start_step == 0:
    loop.log_start(config, state, run.mesh)
  writer = metric_writers.MetricWriter(workdir, enabled=primary, resume_step=start_step)
  seen = loop.Seen(tasks.of(config), optim.create_learning_rate_fn(config), started)
  progress = metric_writers.Progress(total, start_step, fields=seen.task.progress, throughput=seen.task.throughput[:2],
                                     enabled=primary)

  # Loop: one train step, then what is due after it (log, evaluate, save, stop).
  with loop.StopSignal() as stop, contextlib.ExitStack() as cleanup:
    for close in (writer.close, inputs.close, manager.close, manager.wait_until_finished):
      cleanup.callback(close)  # (last in, first out: the step's checkpoint is saved before the input stops)
    for step in range(start_step + 1, total + 1):
      quantized = step > ternary_start
      if step == ternary_start + 1 and steps_lib.is_quantized(config):  # also from scratch: quant.scale_init
        state = loop.switch_to_ternary(state, config, step - 1)
      batch, data_state = inputs.prefetcher.next()
      state, metrics = programs.train(state, batch, quantized)
      seen.pending.append((step, metrics))
      stopping = stop.stop_after(step)
      do_save = step == total or loop.is_due(step, config.checkpoint_every_steps) or stopping
      row = loop.report_step(config, step, total, state, programs, inputs, seen, progress, quantized, do_save)
      if row is not None:
        writer.write(step, row)
        progress.print(step, row)
      if do_save:
        if held is not None:
          held.check()  # a gs:// lease taken over by another run: stop before writing
        saving = time.perf_counter()
        ckpt.save(manager, step, state, data_state, force=True)
        writer.flush()  # a bucket's metrics.jsonl is uploaded with every checkpoint
        seen.exclude(progress, 'save', time.perf_counter() - saving)
      if stopping:
        logging.warning('signal %d: saved checkpoint at step %d, exiting', stop.signum, step)
        manager.wait_until_finished()
        raise SystemExit(128 + stop.signum)

  # Finish: the test split (once, if periodic evaluations looked at validation), then the protocol.
  result = loop.finish(config, workdir, programs, state, inputs, seen, max(start_step, total))
  if primary:
    files.write_json(files.join(workdir, 'result.json'), result)
    metric_writers.write_final(workdir, config, result, result['step'])
    print(reports.format_eval_table(result, config, functional.model_name(run.model)))
  return result
