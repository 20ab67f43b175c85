"""Reliability: SIGKILL/SIGTERM and exact resume (real subprocesses), corrupt checkpoints,
one-line errors for bad input with a non-zero exit and nothing on disk damaged."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, metrics_rows, restored, xla_flags
from ttq_jax import evaluation
from ttq_jax import train
from ttq_jax.errors import CheckpointError

ENV = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED='1')
LONG = ['--config.num_train_steps=12', '--config.checkpoint_every_steps=3', '--config.compilation_cache_dir=']


def _cli(workdir, *extra, config='configs/fashion_mnist.py:smoke'):
  return [sys.executable, '-m', 'ttq_jax.main', '--config', config, '--workdir', str(workdir), *extra]


def _run(cmd, timeout=300, env=ENV):
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(workdir):
  return {r['step']: r for r in metrics_rows(workdir)}


def _interrupt(workdir, sig, *extra):
  """Starts the long smoke run, sends `sig` once checkpoint 3 exists, returns (returncode, output)."""
  p = subprocess.Popen(_cli(workdir, *LONG, *extra), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True)
  try:
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(workdir, 'checkpoints', '3')) and time.time() < deadline:
      if p.poll() is not None:
        break
      time.sleep(0.05)
    p.send_signal(sig)
    out = p.communicate(timeout=120)[0]
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()
  return p.returncode, out


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory):
  """(workdir, console output) of the long smoke run from the command line."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  r = _run(_cli(workdir, *LONG))
  assert r.returncode == 0, r.stderr[-2000:]
  return workdir, r.stdout + r.stderr


@pytest.fixture(scope='module')
def uninterrupted(uninterrupted_run):
  return uninterrupted_run[0]


@pytest.mark.slow
def test_console_shows_our_lines_only(uninterrupted_run):
  """Every INFO line of a training run comes from a ttq_jax module: no orbax / absl / jax internals."""
  _, out = uninterrupted_run
  ours = {f[:-3] for f in os.listdir(os.path.join(ROOT, 'ttq_jax')) if f.endswith('.py')}
  info = [re.match(r'I\d{4} [\d:.]+\s+\d+ (\w+)\.py:\d+\]', l) for l in out.splitlines()]
  info = [m.group(1) for m in info if m]
  assert {'runner', 'loop'} <= set(info) <= ours, sorted(set(info) - ours)
  assert 'CheckpointManagerOptions' not in out and 'Unable to initialize backend' not in out
  assert 'step 12/12 (100.0%)' in out and re.search(r'layer +rule +sparsity +w_p +w_n', out)  # progress, final table


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_bit_for_bit(tmp_path, uninterrupted, smoke_config, sig):
  """The uninterrupted run makes its batches in-process; the SIGKILLed one (and its resume) with 2 input
  worker processes: the same final parameters either way."""
  workers = ['--config.data.worker_processes=2'] if sig == signal.SIGKILL else []
  rc, out = _interrupt(tmp_path, sig, *workers)
  assert rc == -signal.SIGKILL if sig == signal.SIGKILL else rc == 128 + signal.SIGTERM, out[-2000:]
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit())
  assert steps and max(steps) < 12
  if sig == signal.SIGTERM:  # saved where it stopped, not only at the last multiple of 3
    assert 'saved checkpoint at step' in out
  r = _run(_cli(tmp_path, *LONG, *workers))
  assert r.returncode == 0, r.stderr[-2000:]
  smoke_config.num_train_steps = 12
  (sa, a), (sb, b) = restored(uninterrupted, smoke_config), restored(tmp_path, smoke_config)
  assert sa == sb == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  ra, rb = _rows(uninterrupted), _rows(tmp_path)
  assert ra[12]['train_loss'] == rb[12]['train_loss'] and ra[12]['eval_loss'] == rb[12]['eval_loss']
  with open(os.path.join(tmp_path, 'metrics.jsonl')) as f:  # redone steps are not logged twice
    steps = [json.loads(l)['step'] for l in f]
  assert steps == sorted(set(steps)) == sorted(ra)


def _corrupt(step_dir, how):
  if how == 'truncated data':
    for root, _, files in os.walk(os.path.join(step_dir, 'state')):
      for f in files:
        if 'ocdbt.process' in root and '/d' in root:
          with open(os.path.join(root, f), 'r+b') as fh:
            fh.truncate(3)
  elif how == 'missing metadata':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))
    shutil.rmtree(os.path.join(step_dir, 'state', 'ocdbt.process_0'))


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  from configs import fashion_mnist
  config = fashion_mnist.get_config('smoke')
  config.mesh_shape = (1, 1)
  config.compilation_cache_dir = ''
  workdir = str(tmp_path_factory.mktemp('finished'))
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize('how', ['truncated data', 'missing metadata'])
def test_unreadable_newest_step_falls_back(tmp_path, finished, smoke_config, how, caplog):
  workdir = str(tmp_path / 'w')
  shutil.copytree(finished, workdir)
  _corrupt(os.path.join(workdir, 'checkpoints', '6'), how)
  os.makedirs(os.path.join(workdir, 'checkpoints', '9.orbax-checkpoint-tmp-1234', 'state'))  # leftover temp dir
  result = evaluation.evaluate_workdir(smoke_config, workdir)
  assert result['step'] == 3
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '6'))  # eval never moves or deletes
  # training resumes from 3, moves the bad step aside (kept), and saves a good 6 again
  out = train.train_and_evaluate(smoke_config, workdir)
  assert out['step'] == 6
  assert os.listdir(os.path.join(workdir, 'corrupt_checkpoints')) == ['step_6']
  assert restored(workdir, smoke_config)[0] == 6


@pytest.mark.slow
def test_no_readable_checkpoint_is_one_line_and_deletes_nothing(tmp_path, finished, smoke_config):
  workdir = str(tmp_path / 'w')
  shutil.copytree(finished, workdir)
  for s in ('3', '6'):
    _corrupt(os.path.join(workdir, 'checkpoints', s), 'missing metadata')
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  with pytest.raises(CheckpointError, match='no readable checkpoint') as e:
    train.train_and_evaluate(smoke_config, workdir)
  assert '\n' not in str(e.value)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def _bad_cases(tmp_path):
  unwritable = tmp_path / 'file_not_dir'
  unwritable.write_text('x')
  empty = tmp_path / 'empty'
  empty.mkdir()
  return {
      'unknown key': (['--config.quant.tt=1'], "config key 'quant.tt' is unknown: did you mean quant.t"),
      'wrong type': (['--config.batch_size=big'], "--config.batch_size=big: invalid literal for int()"),
      't out of range': (['--config.quant.t=1.5'], 'quant.t=1.5 is out of range'),
      'sparsity out of range': (['--config.quant.sparsity=-0.2'], 'quant.sparsity=-0.2 is out of range'),
      'unknown method': (['--config.quant.method=binary'], "quant.method='binary' is unknown"),
      'target out of range': (['--config.target_accuracy=90'], 'target_accuracy=90.0 is out of range'),
      'unknown model': (['--config.model.name=vgg'], "model.name='vgg' is unknown"),
      'model too big for images': (['--config.model.name=alexnet'], "model.name='alexnet' needs images of at least 44x44"),
      'unknown dataset': (['--config.data.name=svhn'], "data.name='svhn' is unknown"),
      'batch not divisible': (['--config.batch_size=30', '--config.mesh_shape=(-1, 1)'],
                              'batch_size=30 is not divisible by the 4 devices'),
      'missing dataset': (['--config.data.name=cifar10', f'--config.data.data_dir={empty}'],
                          'cifar10 (train[:512]) is not prepared as ArrayRecord'),
      'malformed dataset': (['--config.data.data_dir={bad}'], 'malformed IDX file'),
      'unwritable workdir': ([], 'is not writable'),
      'eval without checkpoints': (['--mode=eval'], 'does not exist: eval, export and sample read a workdir'),
      'missing config': (None, '--config is required'),
      'init_from with warm-up': (['--config.init_from=/runs/fp', '--config.fp_warmup_epochs=1.0'],
                                 "init_from='/runs/fp' and a full-precision warm-up (fp_warmup_epochs=1.0"),
  }, unwritable


BAD_CASES = ['unknown key', 'wrong type', 't out of range', 'sparsity out of range', 'unknown method', 'unknown model',
             'unknown dataset', 'batch not divisible', 'missing dataset', 'malformed dataset', 'unwritable workdir',
             'eval without checkpoints', 'missing config', 'init_from with warm-up']


@pytest.fixture(scope='module')
def bad_input_runs(tmp_path_factory):
  """{case: (exit code, stdout, stderr, workdir)}: every bad command line run as `python -m ttq_jax.main` would
  run it, each in a forked child of one process that imported the libraries once (tests/cli_driver.py)."""
  tmp_path = tmp_path_factory.mktemp('bad_input')
  cases, unwritable = _bad_cases(tmp_path)
  from tests.test_input_pipeline import fake_fashion_mnist
  bad = tmp_path / 'bad'
  bad.mkdir()
  fake_fashion_mnist(bad, corrupt='train-images-idx3-ubyte.gz')
  runs, workdirs = [], {}
  for i, case in enumerate(BAD_CASES):
    extra, _ = cases[case]
    workdir = unwritable / 'sub' if case == 'unwritable workdir' else tmp_path / f'wd_{i}'
    if case == 'malformed dataset':
      extra = [f'--config.data.data_dir={bad}']
    argv = ['--workdir', str(workdir)] if extra is None else _cli(workdir, *extra)[3:]
    runs.append({'argv': argv, 'stdout': str(tmp_path / f'{i}.out'), 'stderr': str(tmp_path / f'{i}.err')})
    workdirs[case] = workdir
  (tmp_path / 'cases.json').write_text(json.dumps(runs))
  env = dict(ENV, XLA_FLAGS=xla_flags(4))
  p = _run([sys.executable, 'tests/cli_driver.py', str(tmp_path / 'cases.json'), str(tmp_path / 'codes.json')],
           timeout=600, env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  codes = json.loads((tmp_path / 'codes.json').read_text())
  return {case: (code, open(r['stdout']).read(), open(r['stderr']).read(), workdirs[case])
          for case, code, r in zip(BAD_CASES, codes, runs)}


@pytest.mark.slow
@pytest.mark.parametrize('case', BAD_CASES)
def test_bad_input_is_one_line_with_nonzero_exit(bad_input_runs, tmp_path, case):
  code, stdout, stderr, workdir = bad_input_runs[case]
  expected = _bad_cases(tmp_path)[0][case][1]
  assert code == 2, stderr[-2000:]  # the README's exit code for bad input
  err = [l for l in stderr.splitlines() if l.startswith('error:')]
  assert len(err) == 1 and expected in err[0], stderr[-2000:]
  assert 'Traceback' not in stderr and 'Traceback' not in stdout
  if case != 'unwritable workdir' and os.path.isdir(workdir):
    assert not os.path.isdir(os.path.join(workdir, 'checkpoints')) or case == 'eval without checkpoints'
