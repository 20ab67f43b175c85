"""Metric output of process 0: WORKDIR/metrics.jsonl, TensorBoard events (tensorboardX), console."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from ttq_jax import files


def _plain(v: Any):
  if isinstance(v, (np.generic, np.ndarray)) and np.ndim(v) == 0:
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricWriter:
  """Writes one JSON object per logged step and TensorBoard scalars; a no-op on other processes.

  Local workdir: metrics.jsonl is appended to and flushed line by line. A bucket has no append: the rows
  are kept in memory and the whole object is uploaded by `flush()` (at every checkpoint and at the end),
  so after a crash the bucket holds the rows up to the last checkpoint, which is where a resume restarts.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    self._rows: list[str] | None = None
    if enabled:
      files.makedirs(workdir)
      self.path = files.join(workdir, 'metrics.jsonl')
      kept = _rows_up_to(self.path, resume_step) if resume_step is not None and files.exists(self.path) else None
      if files.is_url(workdir):
        self._rows = kept or []
      else:
        if kept is not None:  # rows of steps that the resumed run will redo are dropped
          files.write_text(self.path, ''.join(kept))
        self._jsonl = open(self.path, 'a')
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(logdir=workdir, flush_secs=30)
      except ImportError:  # pragma: no cover - tensorboardX is a dependency
        self._tb = None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in scalars.items()}}
    if self._rows is not None:
      self._rows.append(json.dumps(row) + '\n')
    else:
      self._jsonl.write(json.dumps(row) + '\n')
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        v = _plain(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k.replace('.', '/'), v, int(step))

  def flush(self) -> None:
    if self._rows is not None:
      files.write_text(self.path, ''.join(self._rows))
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self.flush()
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def write_final(workdir: str, config, result: Mapping[str, Any], step: int) -> None:
  """TensorBoard records of a finished run (process 0): its hyperparameters (the flattened config) with the final
  test metrics (the HParams tab), the test metrics as `test/*` scalars at `step`, the config as text, and a
  language model's samples as text (`samples/*`)."""
  from tensorboardX import SummaryWriter
  flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
          for k, v in traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.').items()}
  metrics = {f'test/{k}': float(v) for k, v in result.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ('step', 'elapsed_s')}
  with SummaryWriter(logdir=workdir) as writer:
    for k, v in metrics.items():
      writer.add_scalar(k, v, int(step))
    writer.add_text('config', '\n'.join(f'{k} = {v}' for k, v in sorted(flat.items())), int(step))
    for name, text in (result.get('samples') or {}).items():
      writer.add_text(f'samples/{name}', text, int(step))
    writer.add_hparams({k: v for k, v in flat.items() if v is not None}, metrics, name='hparams',
                       global_step=int(step))


def _rows_up_to(path: str, step: int) -> list[str]:
  keep = []
  for line in files.read_text(path).splitlines():
    try:
      if json.loads(line)['step'] <= step:
        keep.append(line + '\n')
    except (ValueError, KeyError, TypeError):
      continue  # a torn last line after a crash
  return keep


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


class Progress:
  """The console progress line. Its steps/s is the rate of the last logging window of training steps only:
  `exclude(seconds)` takes out what was not training (compiling the train step, evaluations, checkpoint saves),
  and `window_rate(step)`, called once per logged step, is the one number the line and metrics.jsonl show.
  `fields`: ((metrics-row key, format), ...) and `throughput`: (row key, unit), the task's words
  (`tasks.Task.progress`, `tasks.Task.throughput`). `clock`: seconds (a fake one in tests)."""

  def __init__(self, total_steps: int, start_step: int = 0, *, fields=(), throughput=('images_per_second', 'img/s'),
               stream=None, enabled: bool = True, clock=time.perf_counter):
    self.total, self.fields, self.throughput, self.enabled = total_steps, tuple(fields), throughput, enabled
    self.stream, self.clock = stream or sys.stdout, clock
    self._step, self._t, self._excluded = start_step, clock(), 0.0

  def exclude(self, seconds: float) -> None:
    """`seconds` of the current window that were not training steps."""
    self._excluded += seconds

  def window_rate(self, step: int) -> float:
    """Training steps per second since the previous call (or the start), less the excluded time; starts a new
    window."""
    now = self.clock()
    seconds = now - self._t - self._excluded
    rate = (step - self._step) / seconds if seconds > 0 and step > self._step else float('nan')
    self._step, self._t, self._excluded = step, now, 0.0
    return rate

  def line(self, step: int, metrics: Mapping[str, Any]) -> str:
    rate = float(metrics.get('steps_per_second', float('nan')))
    eta = (self.total - step) / rate if math.isfinite(rate) and rate > 0 else float('nan')
    parts = [f'step {step:>{len(str(self.total))}}/{self.total} ({100 * step / max(self.total, 1):5.1f}%)']
    for key, fmt in self.fields:
      if key in metrics and metrics[key] is not None:
        parts.append(fmt.format(float(metrics[key])))
    key, unit = self.throughput
    parts.append(f'{rate:.2f} steps/s {float(metrics[key]):.0f} {unit}' if math.isfinite(rate) else 'warming up')
    parts.append(f'ETA {format_duration(eta)}')
    return ' | '.join(parts)

  def print(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self.enabled:
      print(self.line(step, metrics), file=self.stream, flush=True)


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
  """A plain aligned text table."""
  cols = list(zip(header, *rows)) if rows else [(h,) for h in header]
  widths = [max(len(str(c)) for c in col) for col in cols]
  fmt = lambda r: '  '.join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
  return '\n'.join([fmt(header), '  '.join('-' * w for w in widths)] + [fmt(r) for r in rows])
