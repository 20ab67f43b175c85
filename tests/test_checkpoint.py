"""checkpoint.py directly: what a failure to read a step means (corrupt: fall back; transient: retry, then one
line; anything else: raise), judged on the newest of three steps by injecting each kind into the read, in a
local workdir and in a gs:// workdir on the GCS emulator; nothing good is ever moved. Also the structure
check from the trees and the params digest of warm starts."""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import ROOT
from ttq_jax import checkpoint as ckpt
from ttq_jax import state as state_lib
from ttq_jax import workdirs
from ttq_jax import train
from ttq_jax.errors import CheckpointError

INJECTED = {  # kind -> (what the read raises for the newest step, how restore_latest must answer)
    'corrupt status': (ValueError('DATA_LOSS: Error reading "params.conv0.kernel/0.0.0.0" in OCDBT database'), 'corrupt'),
    'corrupt missing file': (FileNotFoundError('File /w/checkpoints/6/data/metadata not found.'), 'corrupt'),
    'transient status': (ValueError('UNAVAILABLE: Error reading "params.conv0.kernel": connection reset'), 'transient'),
    'transient connection': (ConnectionResetError(104, 'Connection reset by peer'), 'transient'),
    'transient timeout': (TimeoutError('read timed out'), 'transient'),
    'bug': (RuntimeError('a bug in an old-format converter'), 'bug'),
}


class HttpError(Exception):  # the shape of gcsfs.retry.HttpError
  def __init__(self, code):
    super().__init__(f'HTTP {code}')
    self.code = code


def _truncated_read_error():
  """What orbax raised for a step with truncated data files (measured): a bare Exception caused by
  tensorstore's ValueError with OUT_OF_RANGE."""
  try:
    try:
      raise ValueError('OUT_OF_RANGE: Error reading "opt_state.1.inner_states.weight" in OCDBT database')
    except ValueError as cause:
      raise Exception('Encountered error while reading array index: (slice(0, 3, 1),)') from cause  # noqa: TRY002
  except Exception as e:  # noqa: BLE001
    return e


@pytest.mark.parametrize('error,kind', [
    *[(e, k) for e, k in INJECTED.values()],
    (_truncated_read_error(), 'corrupt'),
    (KeyError('Item "state" was not found in the checkpoint. Available items: [\'data\']'), 'corrupt'),
    (ckpt.CorruptStepError('no tree metadata'), 'corrupt'),
    (HttpError(503), 'transient'), (HttpError(429), 'transient'), (HttpError(404), 'corrupt'),
    (HttpError(403), 'bug'),
    (KeyError('opt_state'), 'bug'), (TypeError('unhashable type'), 'bug'),
])
def test_classify_read_error(error, kind):
  assert ckpt.classify_read_error(error) == kind


@pytest.fixture(scope='module')
def three_steps(tmp_path_factory):
  """(workdir with checkpoints 2, 4, 6 of the smoke run, its config)."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config('smoke')
  config.mesh_shape, config.compilation_cache_dir, config.checkpoint_every_steps = (1, 1), '', 2
  workdir = str(tmp_path_factory.mktemp('three_steps') / 'run')
  train.train_and_evaluate(config, workdir)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()) == [2, 4, 6]
  return workdir, config


def _listing(workdir):
  return sorted(os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs)


def _inject(monkeypatch, error, step=6):
  """Makes reading `step` raise `error`; returns the steps read, in order. Retries take no time."""
  real, calls = ckpt._restore_step, []

  def read(manager, s, *args):
    calls.append(s)
    if s == step:
      raise error
    return real(manager, s, *args)
  monkeypatch.setattr(ckpt, '_restore_step', read)
  monkeypatch.setattr(ckpt, 'RETRY_DELAYS_S', (0.0, 0.0))
  return calls


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(INJECTED))
def test_each_kind_on_the_newest_of_three_steps(three_steps, tmp_path, monkeypatch, case):
  source, config = three_steps
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  before = _listing(workdir)
  error, kind = INJECTED[case]
  calls = _inject(monkeypatch, error)
  if kind == 'corrupt':  # falls back to the newest readable step; reading moves nothing
    assert workdirs.restore(config, workdir).step == 4 and calls == [6, 4]
    assert _listing(workdir) == before
    moved = ckpt.quarantine_newer(ckpt.create_manager(workdir), workdir, 4)  # what training then does: 6 only
    assert [os.path.basename(m) for m in moved] == ['step_6']
    assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))
  elif kind == 'transient':  # retried, then one line (a CheckpointError: exit 2 from the command line)
    with pytest.raises(CheckpointError, match='step 6 .* failed 3 times with a transient store error') as e:
      workdirs.restore(config, workdir)
    assert '\n' not in str(e.value) and 'nothing was moved' in str(e.value) and calls == [6, 6, 6]
    assert _listing(workdir) == before
  else:  # a bug keeps its type and traceback; no fallback to an older step
    with pytest.raises(type(error), match='a bug in an old-format converter'):
      train.train_and_evaluate(config, workdir)
    assert calls == [6] and _listing(workdir) == before


@pytest.mark.slow
def test_each_kind_in_a_bucket_workdir(three_steps, gcs):
  """The same three answers with the workdir in gs:// (orbax reading through tensorstore's GCS driver)."""
  source, _ = three_steps
  for d, _, fs in os.walk(os.path.join(source, 'checkpoints')):
    for f in fs:
      path = os.path.join(d, f)
      gcs.upload('inject/' + os.path.relpath(path, source), open(path, 'rb').read())
  gcs.upload('inject/config.json', open(os.path.join(source, 'config.json'), 'rb').read())
  before = sorted(gcs.objects('inject/'))
  script = textwrap.dedent('''
      import jax
      from configs import fashion_mnist
      from ttq_jax import checkpoint as ckpt, workdirs
      from ttq_jax.errors import CheckpointError
      config = fashion_mnist.get_config('smoke')
      config.mesh_shape, config.compilation_cache_dir = (1, 1), ''
      real = ckpt._restore_step
      ckpt.RETRY_DELAYS_S = (0.0,)
      for name, error in [('corrupt', ValueError('DATA_LOSS: truncated')), ('transient', ValueError('UNAVAILABLE: x')),
                          ('bug', RuntimeError('converter bug'))]:
        calls = []
        def read(manager, s, *args, error=error, calls=calls):
          calls.append(s)
          if s == 6:
            raise error
          return real(manager, s, *args)
        ckpt._restore_step = read
        try:
          print(name, 'restored', workdirs.restore(config, 'gs://ttq/inject').step, calls)
        except CheckpointError as e:
          print(name, 'CheckpointError', calls, str(e).count(chr(10)))
        except RuntimeError as e:
          print(name, 'RuntimeError', calls)
  ''')
  p = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=gcs.env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'corrupt restored 4 [6, 4]' in p.stdout, p.stdout + p.stderr[-2000:]
  assert 'transient CheckpointError [6, 6] 0' in p.stdout and 'bug RuntimeError [6]' in p.stdout, p.stdout
  assert sorted(gcs.objects('inject/')) == before  # nothing moved in the bucket


@pytest.mark.slow
def test_structure_mismatch_is_decided_from_the_trees(three_steps, tmp_path):
  """Another state structure (TWN has no scales, so no scale optimizer state) is one line naming differing
  leaves, whatever orbax's message would have said; nothing moved."""
  source, config = three_steps
  before = _listing(source)
  config = config.copy_and_resolve_references()
  config.quant.method = 'twn'
  _, twn_state = state_lib.create_mesh_and_state(config, mesh_shape=(1, 1))
  with pytest.raises(CheckpointError, match=r'hold another state structure .* differs in \d+ leaves, e\.g\. .*w_n') as e:
    ckpt.restore_latest(ckpt.create_manager(source, read_only=True), twn_state)
  assert '\n' not in str(e.value) and _listing(source) == before


def test_leaf_shapes_names_paths_as_a_checkpoint_stores_them():
  import flax.struct

  @flax.struct.dataclass
  class S:
    params: dict
    opt: tuple
  tree = S(params={'conv': {'kernel': np.zeros((3, 3))}}, opt=(np.zeros(2), {'mu': np.zeros(())}))
  assert ckpt.leaf_shapes(tree) == {('params', 'conv', 'kernel'): (3, 3), ('opt', '0'): (2,), ('opt', '1', 'mu'): ()}


def test_params_sha256_is_order_free_and_sees_one_changed_value():
  a = {'b': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}, 'a': {'bias': np.zeros(3, np.float32)}}
  b = {'a': {'bias': np.zeros(3, np.float32)}, 'b': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}}
  assert ckpt.params_sha256(a) == ckpt.params_sha256(b)
  b['b']['kernel'] = b['b']['kernel'].copy()
  b['b']['kernel'][1, 2] = np.nextafter(np.float32(5), np.float32(6))
  assert ckpt.params_sha256(a) != ckpt.params_sha256(b)
  assert ckpt.params_sha256(a) != ckpt.params_sha256({'a': a['a'], 'b': {'kernel': a['b']['kernel'].reshape(3, 2)}})
