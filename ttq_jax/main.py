r"""Command line: train, evaluate or export a ternary network from a config file.

    python -m ttq_jax.main --config configs/fashion_mnist.py --workdir workdirs/fmnist [--mode eval]
"""

import logging
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'], 'What to do with the workdir.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0 (jax.distributed).')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
config_flags.DEFINE_config_file('config', None, 'Config file (PATH[:ARG]).', lock_config=True)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


class _QuietLibraries(logging.Filter):
  """Keeps INFO lines of ttq_jax; libraries (orbax, grain, jax, ...) only from WARNING up."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or 'ttq_jax' in record.pathname


def main(argv):
  for handler in logging.getLogger().handlers + logging.getLogger('absl').handlers:
    handler.addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}')
  if FLAGS.config is None:
    _fail('--config is required, e.g. --config configs/fashion_mnist.py')
  if not FLAGS.workdir:
    _fail('--workdir is required')
  from ttq_jax import runner  # heavy imports after flag checks
  try:
    runner.run(FLAGS.config, FLAGS.workdir, FLAGS.mode, coordinator_address=FLAGS.coordinator_address,
               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  except runner.USER_ERRORS as e:
    _fail(str(e))


if __name__ == '__main__':
  logging.getLogger('absl').setLevel(logging.INFO)
  try:
    app.run(main)
  except flags.Error as e:  # noqa: broad flag errors (unknown key, wrong type) as one line
    _fail(str(e).splitlines()[0])
