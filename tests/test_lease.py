"""One writer per workdir (ttq_jax.lease): a second training process on a held workdir is one line, exit 2, and
writes nothing; the lease of a process killed with SIGKILL is taken over at once by the next run."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from ttq_jax import lease as lease_lib
from ttq_jax.errors import ConfigError


def test_a_held_workdir_refuses_a_second_lease_naming_the_holder(tmp_path):
  with lease_lib.Lease(str(tmp_path)) as held:
    record = json.loads((tmp_path / '.lease').read_text())
    assert record['pid'] == os.getpid() and record['started'] == record['renewed']
    with pytest.raises(ConfigError, match=rf'is being trained by another process \(host .*, pid {os.getpid()}, since '):
      lease_lib.Lease(str(tmp_path)).acquire()
    assert held._fd is not None
  lease_lib.Lease(str(tmp_path)).acquire().release()  # released: free again


@pytest.mark.slow
def test_a_second_training_is_refused_and_a_killed_holder_is_taken_over(tmp_path, smoke_config):
  """A process holding the lease (as a training run would) makes `python -m ttq_jax.main` exit 2 in one line with
  nothing written; after the holder is killed with SIGKILL, the same command trains at once."""
  workdir = tmp_path / 'run'
  holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
      import time
      from ttq_jax import lease
      lease.Lease({str(workdir)!r}).acquire()
      print('held', flush=True)
      time.sleep(120)''')], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    cmd = [sys.executable, '-m', 'ttq_jax.main', '--config', 'configs/fashion_mnist.py:smoke', '--workdir', str(workdir),
           '--config.mesh_shape=(1, 1)', '--config.num_train_steps=2', '--config.compilation_cache_dir=']
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = [l for l in refused.stderr.splitlines() if l.startswith('error:')]
    assert len(error) == 1 and 'is being trained by another process (host ' in error[0] and f'pid {holder.pid}' in error[0]
    assert sorted(os.listdir(workdir)) == ['.lease']  # nothing written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  trained = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert trained.returncode == 0, trained.stderr[-2000:]
  assert json.loads((workdir / 'result.json').read_text())['step'] == 2


_GCS_LEASE_SCRIPT = '''
import json, logging, os, time
from ttq_jax import files, lease
from ttq_jax.errors import ConfigError
logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')
root = 'gs://ttq/lease_api'
def refused(l):
  try:
    l.acquire()
  except ConfigError as e:
    return str(e)
  return None
# a live holder: a second creator is refused by the bucket's precondition, naming the holder
a = lease.Lease(root + '/live', renew_s=100, timeout_s=60).acquire()
held = json.loads(files.read_bytes(root + '/live/.lease'))
print('HOLDER', held['pid'] == os.getpid(), held['started'] == a._started)
print('REFUSED', refused(lease.Lease(root + '/live', renew_s=100, timeout_s=60)))
gen = a._generation
print('RENEW', a.renew(), a._generation != gen)
# take_over_lease takes a live-looking lease on purpose; the old holder's next renewal finds it lost
b = lease.Lease(root + '/live', renew_s=100, timeout_s=60, take_over=True).acquire()
print('RENEW_LOST', a.renew(), a.lost['pid'] == os.getpid())
try:
  a.check()
except ConfigError as e:
  print('CHECK', e)
a.release()
print('KEPT', files.exists(root + '/live/.lease'))  # a lost lease is not deleted by its former holder
b.release()
print('RELEASED', files.exists(root + '/live/.lease'))
# an expired lease (not renewed for timeout_s) is taken over with a warning; renewal keeps one alive
c = lease.Lease(root + '/expiring', renew_s=100, timeout_s=1.5).acquire()
d = lease.Lease(root + '/renewed', renew_s=0.3, timeout_s=1.5).acquire()
time.sleep(3)
print('RENEWED', refused(lease.Lease(root + '/renewed', renew_s=0.3, timeout_s=1.5)) is not None)
e = lease.Lease(root + '/expiring', renew_s=100, timeout_s=1.5).acquire()
print('TAKEN', e._generation is not None, c.renew())
for l in (c, d, e):
  l.release()
'''


def test_a_bucket_lease_is_exclusive_renewed_expired_and_taken_over(gcs):
  """gs://: a second creator is refused (the bucket's ifGenerationMatch=0 precondition), renewal is a replace
  conditional on the holder's generation, an unrenewed lease expires after lease_timeout_s and is taken over with
  a warning, take_over_lease takes a live one, and the former holder then finds it lost (check refuses to save)."""
  out = subprocess.run([sys.executable, '-c', _GCS_LEASE_SCRIPT], cwd=ROOT, env=gcs.env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(l.split(' ', 1) for l in out.stdout.splitlines())
  assert lines['HOLDER'] == 'True True'
  assert 'is being trained by another process (host ' in lines['REFUSED'] and 'renewed 0 s ago' in lines['REFUSED']
  assert 'take_over_lease=true' in lines['REFUSED']
  assert lines['RENEW'] == 'True True'
  assert lines['RENEW_LOST'] == 'False True' and 'was taken over by another process' in lines['CHECK']
  assert lines['KEPT'] == 'True' and lines['RELEASED'] == 'False'
  assert lines['RENEWED'] == 'True' and lines['TAKEN'] == 'True False'
  warnings = [l for l in out.stderr.splitlines() if l.startswith('WARNING took over the lease')]
  assert len(warnings) == 2 and 'take_over_lease=true' in warnings[0] and 'not renewed for ' in warnings[1]


@pytest.mark.slow
def test_a_second_training_on_a_bucket_workdir_is_refused_naming_the_holder(gcs):
  """`python -m ttq_jax.main` on a gs:// workdir whose lease a live process holds: exit 2, one line naming the
  holder, nothing but the lease in the bucket. (Taking an expired lease over: the API test above; a killed bucket
  run restarted with take_over_lease resumes: test_gcs.)"""
  workdir = 'gs://ttq/lease_run'
  holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f'''
      import time
      from ttq_jax import lease
      lease.Lease({workdir!r}, renew_s=0.5, timeout_s=3).acquire()
      print('held', flush=True)
      time.sleep(120)''')], cwd=ROOT, env=gcs.env, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    refused = gcs.main(workdir, '--config.num_train_steps=2')
    assert refused.returncode == 2, refused.stderr[-2000:]
    error = [l for l in refused.stderr.splitlines() if l.startswith('error:')]
    assert len(error) == 1 and f'pid {holder.pid}' in error[0] and 'renewed ' in error[0], refused.stderr[-2000:]
    assert gcs.objects('lease_run/') == ['lease_run/.lease']  # nothing written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
