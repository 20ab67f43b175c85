"""metric_writers directly: the JSONL rows and TensorBoard scalars as written, rows not duplicated across a
resume (a torn last line dropped), the progress line and the table."""

import glob
import json
import os
import struct

import numpy as np
import pytest

from ttq_jax import metric_writers


def _events(workdir) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in the TensorBoard event files (TFRecord of Event protos)."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents*'))):
    data = open(path, 'rb').read()
    i = 0
    while i < len(data):
      (length,) = struct.unpack('<Q', data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for v in event.summary.value:
        out.append((event.step, v.tag, v.simple_value))
  return out


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


def test_rows_and_scalars_as_written(tmp_path):
  w = metric_writers.MetricWriter(str(tmp_path))
  w.write(1, {'train_loss': np.float32(2.5), 'eval.top1': 0.25, 'finite': True, 'note': 'x'})
  w.write(2, {'train_loss': 1.5})
  w.close()
  assert _rows(tmp_path) == [{'step': 1, 'train_loss': 2.5, 'eval.top1': 0.25, 'finite': True, 'note': 'x'},
                             {'step': 2, 'train_loss': 1.5}]
  # numbers become scalars ('.' -> '/'); booleans and strings do not
  assert sorted(_events(tmp_path)) == [(1, 'eval/top1', 0.25), (1, 'train_loss', 2.5), (2, 'train_loss', 1.5)]


def test_resume_drops_rows_of_steps_that_will_be_redone(tmp_path):
  w = metric_writers.MetricWriter(str(tmp_path))
  for step in (2, 4, 6):
    w.write(step, {'train_loss': float(step)})
  w.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 8, "train_lo')  # a torn line of a crash
  w = metric_writers.MetricWriter(str(tmp_path), resume_step=4)  # the checkpoint resumed from
  w.write(6, {'train_loss': 60.0})
  w.close()
  assert [(r['step'], r['train_loss']) for r in _rows(tmp_path)] == [(2, 2.0), (4, 4.0), (6, 60.0)]


def test_disabled_writer_writes_nothing(tmp_path):
  w = metric_writers.MetricWriter(str(tmp_path / 'other'), enabled=False)
  w.write(1, {'a': 1.0})
  w.close()
  assert not os.path.exists(tmp_path / 'other')


@pytest.mark.parametrize('seconds,text', [(5, '5s'), (65, '1m05s'), (3725, '1h02m')])
def test_format_duration(seconds, text):
  assert metric_writers.format_duration(seconds) == text


def test_table_aligns_columns():
  out = metric_writers.table([('conv', '0.10'), ('res1_0/conv1', '0.5')], ('layer', 'sparsity'))
  lines = out.splitlines()
  assert lines[0].split() == ['layer', 'sparsity'] and set(lines[1]) <= {'-', ' '}
  assert len(lines[0]) == len(lines[2]) == len(lines[3])  # right-aligned values end under their header
  assert lines[2].endswith(' 0.10') and lines[3].startswith('res1_0/conv1 ')


def test_progress_rate_is_the_last_windows_training_steps_and_the_line_prints_the_recorded_number():
  """Fake clock: 10 steps in 9 s of which 4 s were evaluation and compilation -> 2 steps/s, not 10 / 9; the next
  window starts where this one ended; the line prints the row's number (the one metrics.jsonl records)."""
  import io
  from ttq_jax import tasks
  now = [100.0]
  task = tasks.TASKS['next_byte']
  stream = io.StringIO()
  p = metric_writers.Progress(30, 0, fields=task.progress, throughput=task.throughput[:2], stream=stream,
                              clock=lambda: now[0])
  now[0] = 109.0
  p.exclude(3.0)
  p.exclude(1.0)
  assert p.window_rate(10) == pytest.approx(2.0)
  now[0] = 114.0  # 10 more steps in 5 s, nothing excluded
  rate = p.window_rate(20)
  assert rate == pytest.approx(2.0)
  row = {'train_loss': 1.0, 'train_bits_per_byte': 1.4427, 'steps_per_second': rate, 'bytes_per_second': rate * 256}
  now[0] = 500.0  # the clock is not read again for the line
  p.print(20, row)
  line = stream.getvalue()
  assert '2.00 steps/s 512 bytes/s' in line and 'ETA 5s' in line and 'img/s' not in line and 'top1' not in line
