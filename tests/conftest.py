"""Test setup: 8 simulated CPU devices (before any JAX computation) and shared fixtures."""

import os
import sys

import jax

jax.config.update('jax_num_cpu_devices', 8)
import tempfile  # noqa: E402

# One persistent compilation cache per test session: tests that build the same programs
# (resume, eval after train) compile them once.
jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='ttq_jax_xla_cache_'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture
def smoke_config():
  """The quickstart's smoke variant on one device (tests that need more devices set mesh_shape)."""
  from configs import fashion_mnist
  config = fashion_mnist.get_config('smoke')
  config.mesh_shape = (1, 1)
  config.compilation_cache_dir = ''
  return config
