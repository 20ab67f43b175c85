"""Modes: one shape for train / eval / export, dispatched from one table; bugs keep their traceback."""

import inspect
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from ttq_jax import errors
from ttq_jax import runner


@pytest.mark.parametrize('mode', sorted(runner.MODES))
def test_every_mode_takes_config_and_workdir(mode):
  params = list(inspect.signature(runner.mode_fn(mode)).parameters)
  assert params[:2] == ['config', 'workdir']


def test_unknown_mode_names_the_allowed_ones():
  with pytest.raises(errors.ConfigError, match="mode='serve' is unknown: allowed are train, eval, export"):
    runner.mode_fn('serve')


def test_user_errors_are_ours_and_bugs_are_not():
  assert KeyError not in errors.USER_ERRORS and TypeError not in errors.USER_ERRORS
  assert all(issubclass(e, Exception) for e in errors.USER_ERRORS)


@pytest.mark.slow
def test_a_bug_prints_its_traceback(tmp_path):
  """A config file without a key the code reads is a programming error, not bad user input: traceback,
  exit status 1, no one-line `error:`."""
  config = tmp_path / 'broken.py'
  config.write_text('from configs import fashion_mnist\n\n\ndef get_config():\n'
                    "  c = fashion_mnist.get_config('smoke')\n  c.unlock()\n  del c['export']\n  return c\n")
  r = subprocess.run([sys.executable, '-m', 'ttq_jax.main', '--config', str(config), '--workdir', str(tmp_path / 'w')],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 1 and 'Traceback' in r.stderr, r.stderr[-2000:]
  assert not any(l.startswith('error:') for l in r.stderr.splitlines())


@pytest.mark.parametrize('pathname,shown', [
    ('{pkg}train.py', True),
    ('/home/me/ttq_jax/.venv/lib/python3.11/site-packages/orbax/checkpoint/manager.py', False),  # checkout named ttq_jax
    ('/usr/lib/python3/dist-packages/jax/_src/xla_bridge.py', False),
])
def test_console_filter_keeps_our_info_lines_only(pathname, shown):
  import logging
  from ttq_jax import main
  f = main.QuietLibraries()
  record = logging.LogRecord('x', logging.INFO, pathname.format(pkg=f.PACKAGE_DIR), 1, 'msg', None, None)
  assert f.filter(record) is shown
  record.levelno = logging.WARNING  # warnings of every library are shown ...
  assert f.filter(record)
  record.msg = 'Given directory is read only=%s'  # ... but for orbax's note on a manager we open read-only
  assert f.filter(record) is shown


def test_interrupted_exits_130_and_other_user_errors_2(monkeypatch, capsys):
  """The one-line `error:` of a user error, with its exit code: 130 for an interrupt that has saved what it
  could, 2 otherwise."""
  from ttq_jax import main
  with pytest.raises(SystemExit) as e:
    main._fail('interrupted during the final test evaluation', errors.Interrupted.exit_code)
  assert e.value.code == 130 and capsys.readouterr().err == 'error: interrupted during the final test evaluation\n'
  with pytest.raises(SystemExit) as e:
    main._fail('bad value')
  assert e.value.code == 2


@pytest.mark.slow
def test_sigint_during_the_final_evaluation_is_one_line(smoke_config, tmp_path, monkeypatch):
  """SIGINT (KeyboardInterrupt) while the test split is evaluated at the end: the run's last checkpoint is
  saved; the error says so, as an `Interrupted` (exit 130 from the command line)."""
  from ttq_jax import checkpoint as ckpt, loop, train
  smoke_config.data.validation_examples = 128  # so the final test evaluation is its own phase

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(loop, 'final_test', interrupted)
  with pytest.raises(errors.Interrupted, match=r'interrupted during the final test evaluation; the checkpoint of '
                                               r'step 6 is saved in .*`--mode eval` evaluates it'):
    train.train_and_evaluate(smoke_config, str(tmp_path / 'run'))
  assert 6 in ckpt.create_manager(str(tmp_path / 'run'), read_only=True).all_steps()


def test_unwritable_or_missing_workdir_in_eval_and_export_is_one_line_before_any_work(smoke_config, tmp_path):
  from ttq_jax import evaluation, export
  with pytest.raises(errors.ConfigError, match=r"workdir='/proc/self' is not writable"):  # eval: see eval_dir
    export.export_workdir(smoke_config, '/proc/self')
  for fn in (evaluation.evaluate_workdir, export.export_workdir):
    with pytest.raises(errors.ConfigError, match=r'workdir .*/missing/run does not exist: eval, export and sample read'):
      fn(smoke_config, str(tmp_path / 'missing' / 'run'))
    assert not (tmp_path / 'missing').exists()  # never created


def test_a_refused_start_leaves_nothing_and_the_corrected_command_runs(smoke_config, tmp_path, caplog):
  """A bad init_from is refused before anything is written (no workdir left behind, not even empty); a workdir
  holding only a config.json (a start that saved no step) is no run: another config replaces it, with a warning."""
  from ttq_jax import train
  workdir = tmp_path / 'new' / 'run'
  smoke_config.num_train_steps, smoke_config.fp_warmup_epochs = 2, 0.0
  smoke_config.init_from = str(tmp_path / 'does_not_exist')
  with pytest.raises(errors.CheckpointError) as e:
    train.train_and_evaluate(smoke_config, str(workdir))
  assert 'does_not_exist' in str(e.value) and '\n' not in str(e.value)
  assert not (tmp_path / 'new').exists()
  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text('{"model": {"name": "resnet20"}, "quant": {"method": "twn"}}')
  smoke_config.init_from = ''
  with caplog.at_level('WARNING'):
    result = train.train_and_evaluate(smoke_config, str(workdir))
  assert result['step'] == 2 and 'holds a config.json but no checkpoint' in caplog.text
