r"""Command line: train, evaluate or export a ternary network from a config file.

    python -m ttq_jax.main --config configs/fashion_mnist.py --workdir workdirs/fmnist [--mode eval]
"""

import logging
import os
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from ttq_jax import errors
from ttq_jax import runner  # light: the modes import JAX when they run

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
flags.DEFINE_enum('mode', 'train', list(runner.MODES), 'What to do with the workdir.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0 (jax.distributed).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
flags.DEFINE_bool('log_libraries', False, "Also show the libraries' INFO logging (orbax, grain, jax, ...).")
config_flags.DEFINE_config_file('config', None, 'Config file (PATH[:ARG]).', lock_config=True)


def _fail(message: str, code: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


class QuietLibraries(logging.Filter):
  """Keeps every record logged from a file of the ttq_jax package; libraries (orbax, grain, jax, ...) only
  from WARNING up. Decided by the file's place, not by its name: a checkout folder named `ttq_jax` with
  a virtual environment inside must not let the libraries' INFO lines through."""

  PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
  # Library warnings about what we asked for on purpose: orbax warns whenever a manager is opened read-only
  # (evaluation, export and `init_from` read checkpoints that way) and when a step lacks its optional
  # `_CHECKPOINT_METADATA` file (we write checkpoints without it).
  EXPECTED_WARNINGS = ('Given directory is read only', 'Metadata file does not exist')

  def filter(self, record):
    if os.path.abspath(record.pathname).startswith(self.PACKAGE_DIR):
      return True
    if record.levelno == logging.WARNING and str(record.msg).startswith(self.EXPECTED_WARNINGS):
      return False
    return record.levelno >= logging.WARNING


def main(argv):
  if not FLAGS.log_libraries:
    for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
      handler.addFilter(QuietLibraries())
    # gcsfs logs each request that ran out of retries with a traceback, then raises the same error to its
    # caller, which reports it (a bad workdir as one line; anything else with its own traceback).
    logging.getLogger('gcsfs').setLevel(logging.CRITICAL)
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}')
  config = FLAGS.config
  reads_workdir = FLAGS.mode in ('eval', 'export', 'sample')  # the workdir's config.json is the config
  if config is None and not reads_workdir:
    _fail('--config is required, e.g. --config configs/fashion_mnist.py')
  if config is not None and not isinstance(config, ml_collections.ConfigDict):  # ml_collections defers load errors
    try:
      config.seed
    except OSError as e:
      _fail(f'cannot load --config={config_flags.get_config_filename(FLAGS["config"])}: no such config file '
            f'({str(e).splitlines()[0]})')
  if not FLAGS.workdir:
    _fail('--workdir is required')
  try:
    if reads_workdir:
      from ttq_jax import workdirs  # noqa: PLC0415 - imports JAX; only the modes that read a workdir need it
      if _OVERRIDES_ON_BASE:  # overrides without --config: the workdir's saved config with these keys changed
        config = _with_overrides(workdirs.workdir_config(None, FLAGS.workdir), config, explicit_overrides(sys.argv))
      workdirs.check_overrides(FLAGS.workdir, explicit_overrides(sys.argv), config)
    runner.run(config, FLAGS.workdir, FLAGS.mode, coordinator_address=FLAGS.coordinator_address,
               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  except errors.USER_ERRORS as e:  # anything else is a bug and keeps its traceback
    _fail(str(e), getattr(e, 'exit_code', 2))


def explicit_overrides(argv) -> list[str]:
  """The config keys set on the command line (`--config.KEY=VALUE` or `--config.KEY VALUE`)."""
  return [a[len('--config.'):].split('=', 1)[0] for a in argv if a.startswith('--config.')]


# Set when --mode eval / export / sample got --config.KEY overrides without --config: they were parsed on
# `schema_config.py` (every key at its default) and are applied to the workdir's saved config (`_with_overrides`).
_OVERRIDES_ON_BASE = False


def _with_overrides(saved, parsed, keys):
  """`saved` (a workdir's config) with the values `parsed` holds for the overridden `keys`."""
  config = saved.copy_and_resolve_references()
  for key in keys:
    *parents, leaf = key.split('.')
    src, dst = parsed, config
    for part in parents:
      src, dst = src[part], dst[part]
    dst[leaf] = src[leaf]
  return config


def _unknown_override(keys) -> str:
  """One line naming the first overridden key that is not a config key, with close matches (config_schema.json)."""
  import difflib  # noqa: PLC0415 - only on this error
  import json  # noqa: PLC0415
  with open(os.path.join(os.path.dirname(__file__), 'config_schema.json')) as f:
    known = sorted(json.load(f))
  unknown = [k for k in keys if k not in known and not any(n.startswith(k + '.') for n in known)] or ['?']
  close = difflib.get_close_matches(unknown[0], known, n=3)
  return (f'config key {unknown[0]!r} is unknown' + (f': did you mean {", ".join(close)}?' if close else
                                                      ' (configs/base.py lists every key)'))


def parse_flags(argv):
  """absl flag parsing with every bad flag or --config override as a one-line error. For the modes that read a
  workdir, overrides need no --config: they are parsed on schema_config.py (every key) and applied to the
  workdir's config."""
  global _OVERRIDES_ON_BASE
  mode = next((a.split('=', 1)[1] for a in argv if a.startswith('--mode=')),
              next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == '--mode'), 'train'))
  has_config = any(a == '--config' or a.startswith('--config=') for a in argv)
  if mode in ('eval', 'export', 'sample') and explicit_overrides(argv) and not has_config:
    argv = [argv[0], f'--config={os.path.join(os.path.dirname(__file__), "schema_config.py")}', *argv[1:]]
    _OVERRIDES_ON_BASE = True
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    if "flag 'config." in str(e) and not any(a == '--config' or a.startswith('--config=') for a in argv):
      _fail(f'{explicit_overrides(argv)[0] if explicit_overrides(argv) else "a --config.KEY override"}: overrides '
            'need a --config file (for --mode eval / export, e.g. the one the run was trained with; the '
            "workdir's config.json still decides what was trained)")
    _fail(lines[0] if len(lines) == 1 else f'{lines[0].split(":")[0]}: {lines[-1].strip()}')
  except (KeyError, AttributeError):  # an override of a key the config does not have
    _fail(_unknown_override(explicit_overrides(argv)))
  except (TypeError, ValueError, OSError) as e:  # config_flags wraps get_config errors with a traceback
    lines = [l for l in str(e).splitlines() if l.strip()]
    _fail(f'bad --config or override: {lines[-1] if lines else type(e).__name__}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
