"""Test setup: 8 simulated CPU devices (before any JAX computation), shared fixtures and helpers."""

import json
import os
import sys

import jax
import numpy as np

# XLA flags of every test process (the command lines the tests start get them too: `xla_flags`):
# - LLVM at optimisation level 0: the tests' programs are compile-bound (tiny models, a few steps), and compile
#   ~2x faster (measured: a smoke run's compiles 8.9 s -> 3.7 s on 8 devices) into slower code the tests barely
#   run. Numbers move by float rounding only, and every comparison a test makes is between runs made with the
#   same flags.
# - XLA:CPU's MLIR fusion emitters off: the older emitters compile the same fusions in ~half the time (measured:
#   a smoke run's compiles on 8 devices 6.2-7.3 s -> 3.2-4.0 s at level 0).
# - Eigen's intra-op thread pool off: two tests run at once (xdist workers) on 2 cores, and a pool whose threads
#   share the cores with another busy process waits on them (measured: the AlexNet runlocal test 22 s alone,
#   48 s beside one busy process with the pool, 23 s without it).
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false --xla_cpu_multi_thread_eigen=false'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a command line a test starts: the tests' compile flags, and `devices` CPU devices."""
  return TEST_XLA_FLAGS + (f' --xla_force_host_platform_device_count={devices}' if devices else '')


jax.config.update('jax_num_cpu_devices', 8)
import tempfile  # noqa: E402

# One persistent compilation cache per test process (each xdist worker): tests that build the same programs
# (resume, eval after train) compile them once. The command lines the tests start find it too: their
# `compilation_cache_dir='default'` is $XDG_CACHE_HOME/ttq_jax/xla (measured on 2 cores: a smoke run takes
# ~8 s with it warm against ~24 s compiling). Per process, not shared between the workers: JAX writes an entry
# without a lock, and a run reading one the other worker is writing warns and recompiles.
XDG_CACHE = tempfile.mkdtemp(prefix='ttq_jax_test_cache_')
os.environ['XDG_CACHE_HOME'] = XDG_CACHE
jax.config.update('jax_compilation_cache_dir', os.path.join(XDG_CACHE, 'ttq_jax', 'xla'))
# Every program cached, however short its compile (JAX's default skips those under 1 s, ttq_jax's under 0.5 s):
# a run compiles dozens of small ones (eager ops of the reports, the schedule), and a test's command lines each
# paid ~1.5 s for them. Set in the environment too, where the command lines the tests start read it.
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_all(procs, timeout: float) -> list[str]:
  """Waits for every process with a bounded time-out, kills all of them on any failure, asserts each
  exited 0; returns their outputs."""
  try:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def metrics_rows(workdir) -> list[dict]:
  """WORKDIR/metrics.jsonl as a list of dicts, in file order."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def restored(workdir, config, step=None):
  """(step, host copy of the train state) of the newest (or `step`) checkpoint, on one device."""
  from ttq_jax import workdirs
  r = workdirs.restore(config, str(workdir), step=step, mesh_shape=(1, 1))
  return r.step, jax.device_get(r.state)


def scaled_allclose(actual, reference, tol, err_msg=''):
  """Each pair of leaves agrees to `tol` times the reference leaf's largest magnitude.

  Rounding of float32 sums (another reduction order on another device count, or another XLA kernel)
  is relative to the magnitude of what is summed, not to each element: an element that happens to be
  near 0 carries the same absolute error as its large neighbours. A wrong sign, a missing all-reduce
  or a mis-scaled gradient is O(1) of the array's scale and fails any tol << 1.
  """
  actual, reference = jax.tree.leaves(actual), jax.tree.leaves(reference)
  assert len(actual) == len(reference)
  for i, (x, y) in enumerate(zip(actual, reference)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = float(np.max(np.abs(y))) if y.size else 0.0
    np.testing.assert_allclose(x, y, rtol=0, atol=tol * scale, err_msg=f'{err_msg} leaf {i} (scale {scale:.3g})')



@pytest.fixture(scope='session')
def gcs():
  """One fake-gcs-server on 127.0.0.1 with the bucket `ttq`, for the whole session (tests/gcs_emulator.py)."""
  from tests.gcs_emulator import running_emulator
  with running_emulator() as emulator:
    yield emulator


def make_smoke_config():
  """The quickstart's smoke variant on one device (tests that need more devices set mesh_shape)."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config('smoke')
  config.mesh_shape = (1, 1)
  config.compilation_cache_dir = ''
  return config


@pytest.fixture
def smoke_config():
  return make_smoke_config()


def write_text_corpus(root) -> str:
  """A small reStructuredText-like corpus (80 documents, ~40 KB, every split non-empty) in `root`: what tests of
  the text datasets read instead of the apt package."""
  import os
  import random
  rng = random.Random(0)
  words = ('the of a to in is for module function returns object class value list with this that be string '
           'default import def print').split()
  for i in range(80):
    d = os.path.join(str(root), 'library' if i % 2 else 'howto')
    os.makedirs(d, exist_ok=True)
    body = ' '.join(rng.choice(words) for _ in range(80))
    with open(os.path.join(d, f'doc{i}.rst.txt'), 'w') as f:
      f.write(f'Document {i}\n{"=" * 12}\n\n{body}\n.. function:: f{i}(x)\n')
  return str(root)


@pytest.fixture(scope='session')
def text_corpus(tmp_path_factory):
  return write_text_corpus(tmp_path_factory.mktemp('python_docs'))


def make_lm_smoke_config(corpus: str):
  """configs/lm.py:smoke on `corpus` (a folder of *.rst.txt), no compilation cache."""
  from configs import lm
  config = lm.get_config('smoke')
  config.data.data_dir = corpus
  config.compilation_cache_dir = ''
  return config


# Test files by how long they take (seconds of one xdist worker on the 2-core CI machine, measured with
# `--durations`); `make test` hands whole files to two workers in collection order (--no-loadscope-reorder), so
# the longest go first and the short ones fill in behind them (otherwise one worker ends on a long file while
# the other idles). Files not listed keep their order after these.
LONGEST_FIRST = ('test_gcs.py', 'test_multihost.py', 'test_reliability.py', 'test_train.py', 'test_protocol.py',
                 'test_notebook.py', 'test_lm.py', 'test_lm_table.py', 'test_lm_study.py', 'test_scale_out.py',
                 'test_export.py', 'test_functional.py',
                 'test_configs.py', 'test_readme.py',
                 'test_state.py', 'test_checkpoint.py', 'test_byo.py', 'test_benchmark_input.py')


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))  # stable: order within files kept
