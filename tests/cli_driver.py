"""Runs many `python -m ttq_jax.main ARGS` command lines from one process: it imports the heavy libraries once
(no JAX backend is started), then runs each command line in a forked child with its own stdout / stderr
files, so each costs a fork instead of a Python start and ~3 s of imports. A child is a fresh copy of this
process: `ttq_jax.main` (its absl flags) is imported in the child only, as `python -m` would.

    python tests/cli_driver.py CASES.json RESULTS.json
    CASES.json: [{"argv": [...], "stdout": PATH, "stderr": PATH}, ...]   RESULTS.json: [exit code, ...]

Used by tests whose command lines fail fast (bad input). The environment of the driver (JAX_PLATFORMS,
XLA_FLAGS) is every child's.
"""

import json
import os
import runpy
import signal
import sys
import time

TIMEOUT_S = 120


def _child(argv, stdout, stderr) -> None:
  out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(out, 1)
  os.dup2(err, 2)
  code = 0
  sys.argv = ['ttq_jax.main', *argv]
  try:
    runpy.run_module('ttq_jax.main', run_name='__main__', alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
  except BaseException:  # noqa: BLE001 - a traceback, as `python -m` prints it
    import traceback
    traceback.print_exc()
    code = 1
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
  os._exit(code)


def run(argv, stdout, stderr) -> int:
  pid = os.fork()
  if pid == 0:
    _child(argv, stdout, stderr)
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    time.sleep(0.02)
  os.kill(pid, signal.SIGKILL)
  os.waitpid(pid, 0)
  return -signal.SIGKILL


def main(cases_path: str, results_path: str) -> None:
  # What `python -m ttq_jax.main` imports before it fails on bad input, without starting a JAX backend.
  import jax  # noqa: F401
  import ml_collections  # noqa: F401
  from ttq_jax import config_check, evaluation, export, runner, train  # noqa: F401
  with open(cases_path) as f:
    cases = json.load(f)
  codes = [run(c['argv'], c['stdout'], c['stderr']) for c in cases]
  with open(results_path, 'w') as f:
    json.dump(codes, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
