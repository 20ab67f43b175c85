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
